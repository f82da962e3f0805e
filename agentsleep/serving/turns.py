"""An agent turn on the server side, without vLLM or HTTP: where its memory comes from, how it is saved exactly once,
and when the agent sleeps (`AgentTurns`; the ASGI middleware in `agentsleep.serving.server` drives it).

* Memory stays resident between an agent's turns (`Memory`, keyed by agent id, LRU): a turn reads the store's current
  snapshot id (one indexed read) and loads the snapshot only when that id is not the resident one (another host, or a
  sleep, moved the agent on).
* A turn is saved with a compare-and-set on the snapshot it started from (`SnapshotStore.save(expect_current=...)`;
  creating an agent expects `NO_SNAPSHOT`), so two hosts serving the same agent can never both succeed from the same
  memory: the loser gets `SnapshotConflict` and nothing is written.
* A turn with a ``turn_id`` stores its reply; the same id again is answered from the store (`Turn.replay`).
* Sleeps (background, or the one a turn must wait for) are compare-and-sets too, and run under the agent's lock on
  this host, so a turn and a sleep of one agent never overlap here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from agentsleep.errors import InvalidInput, SleepFailed, SnapshotConflict, UnknownAgent, WindowOverflow
from agentsleep.memory.policy import SleepPolicy
from agentsleep.memory.scheduler import SleepOutcome, SleepRequest, SleepScheduler
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.model.state import FastWeights
from agentsleep.runtime.engine import check_token_ids
from agentsleep.runtime.text import TextCodec
from agentsleep.serving.params import FIELD, AgentParams, ConnectorParams
from agentsleep.serving.resident import LRU, state_key
from agentsleep.store import LoadedSnapshot, SnapshotRecord, SnapshotStore
from agentsleep.store.store import NO_SNAPSHOT

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # the OpenAI completions default
# Request fields an agent turn cannot honour: several choices would each continue the same memory; prompt log-probs
# make vLLM skip the connector (the restored S would be silently dropped); echo/suffix change what the prompt is.
UNSUPPORTED = {"n": (1, None), "best_of": (1, None), "echo": (False, None), "prompt_logprobs": (None,),
               "suffix": (None,), "prompt_embeds": (None,)}  # fmt: skip
REPLY_KEYS = ("text", "token_ids", "finish_reason", "stop_reason")  # what a turn with a turn_id stores for replay
_MAX_SYNC_SLEEPS = 3  # sleeps one turn may wait for before it gives up (503)


@dataclass(frozen=True)
class Memory:
    """An agent's memory as of one snapshot: the S its window started from, and the window's tokens."""

    record: SnapshotRecord
    state: FastWeights
    window: tuple[int, ...]
    key: str  # resident.state_key(state)

    @classmethod
    def of(cls, loaded: LoadedSnapshot) -> Memory:
        return cls(loaded.record, loaded.state, tuple(int(t) for t in loaded.window), state_key(loaded.state))

    def counter(self, name: str) -> int:
        v = self.record.meta.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


@dataclass
class Turn:
    """One attempt at an agent turn (`AgentTurns.plan`): the vLLM request, and what its save compares against."""

    params: AgentParams
    input_ids: list[int]
    max_tokens: int
    base: Memory | None  # the memory the turn starts from (None: S = 0, empty window)
    expect: str  # the agent's current snapshot id when planned (NO_SNAPSHOT: it had none): the compare-and-set
    body: dict[str, Any] = field(default_factory=dict)  # the request for vLLM
    replay: SnapshotRecord | None = None  # a repeated turn id: the snapshot its first run saved
    lock: threading.Lock | None = None  # the agent's lock on this host, held from plan to release

    @property
    def agent_id(self) -> str:
        return self.params.agent_id


def input_digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:32]


class AgentTurns:
    """Agents' memories on the server side: planning a turn, saving it exactly once, and sleeping.

    The blocking methods (`plan`, `commit`, the sleep job) run in worker threads; `check` and `release` are cheap.

    Args:
        model: the reference model (sleeps run on it, in PyTorch); its config gives L, N and the BOS.
        store: the snapshot store shared with the connector and with other hosts.
        codec: the tokenizer for text prompts (None: token-id prompts only).
        policy: when to sleep (default: L and N of the model).
        resident_agents: agents whose memory stays resident between turns (LRU).
    """

    def __init__(
        self,
        model: SleepHybrid,
        store: SnapshotStore,
        codec: TextCodec | None = None,
        policy: SleepPolicy | None = None,
        *,
        sleep_workers: int = 1,
        resident_agents: int = 256,
    ) -> None:
        cfg = model.config
        if cfg.bos_token_id is None:
            raise InvalidInput("agentsleep serve needs a checkpoint with bos_token_id: every window opens with it")
        self.model, self.store, self.codec = model, store, codec
        self.L = cfg.window
        self.bos = int(cfg.bos_token_id)
        self.policy = policy or SleepPolicy(window=cfg.window, passes=cfg.passes)
        self.scheduler = SleepScheduler(self._sleep_job, self.policy, max_workers=sleep_workers)
        self.resident: LRU[str, Memory] = LRU(resident_agents)  # agent id -> memory as of its current snapshot
        self._snapshots: LRU[str, Memory] = LRU(64)  # snapshots named by snapshot_id (immutable)
        self._zero = model.init_state(1)
        self._zero_key = state_key(self._zero)
        self._locks: dict[str, threading.Lock] = {}
        self._async_locks: dict[str, asyncio.Lock] = {}
        self._guard = threading.Lock()
        self.stats = {"resident_hits": 0, "store_loads": 0, "conflicts": 0, "replays": 0}

    @property
    def fingerprint(self) -> str:
        """What every snapshot this server loads must carry (`SnapshotStore.load` / `latest` compare it)."""
        return self.model.fingerprint

    def close(self) -> None:
        self.scheduler.shutdown(wait=False, cancel_pending=True)

    def agent_lock(self, agent_id: str) -> threading.Lock:
        """Excludes a background sleep and a request of the same agent from each other (this host only)."""
        with self._guard:
            return self._locks.setdefault(agent_id, threading.Lock())

    def request_lock(self, agent_id: str) -> asyncio.Lock:
        """Serialises requests of one agent on this host (event-loop side)."""
        return self._async_locks.setdefault(agent_id, asyncio.Lock())

    # ------------------------------------------------------------------ validation (cheap, no store)

    def check(self, body: dict[str, Any]) -> tuple[list[int], int]:
        """The turn's input ids and ``max_tokens``; `InvalidInput` / `WindowOverflow` before anything runs."""
        for key, allowed in UNSUPPORTED.items():
            if key in body and body[key] not in allowed:
                raise InvalidInput(f"{key}={body[key]!r} is not supported for agent requests ({FIELD})")
        ids = self._input_ids(body)
        max_tokens = body.get("max_tokens")
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInput(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if len(ids) + max_tokens > self.L + 1:  # the window (L) plus the reply's last token, which is never fed
            raise WindowOverflow(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) do not fit one window "
                f"(L={self.L}, +1 for the reply's last token); shorten them or split the input into several turns"
            )
        return ids, max_tokens

    def _input_ids(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
            if len(prompt) != 1:
                raise InvalidInput("an agent request takes one prompt (one turn), not a batch of prompts")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.codec is None:
                raise InvalidInput("this checkpoint has no tokenizer.json: send the prompt as token ids")
            return check_token_ids(self.codec.encode(prompt), self.model.config.vocab_size, what="prompt")
        return check_token_ids(prompt, self.model.config.vocab_size, what="prompt")

    # ------------------------------------------------------------------ a turn (worker threads)

    def plan(self, params: AgentParams, body: dict[str, Any], ids: list[int], max_tokens: int) -> Turn:
        """Find the memory the turn starts from (resident, or the store on a miss), sleep first if the input does not
        fit, and compose the vLLM request. On return the agent's lock is held: `release` it."""
        self.scheduler.notify_turn(params.agent_id)
        try:
            return self._plan(params, body, ids, max_tokens)
        except BaseException:
            self.scheduler.turn_finished(params.agent_id)  # release the sleeps this turn held
            raise

    def _plan(self, params: AgentParams, body: dict[str, Any], ids: list[int], max_tokens: int) -> Turn:
        agent_id = params.agent_id
        if params.turn_id is not None:
            done = self.store.find_by_metadata(agent_id, "turn_id", params.turn_id)
            if done is not None:
                turn_meta = done.meta.get("turn")
                if not isinstance(turn_meta, dict) or turn_meta.get("input") != input_digest(ids):
                    raise InvalidInput(
                        f"turn_id {params.turn_id!r} of agent {agent_id!r} was already used for another input; "
                        "use a new turn_id for a new turn"
                    )
                self.stats["replays"] += 1
                return Turn(params, ids, max_tokens, None, done.id, replay=done)
        lock = self.agent_lock(agent_id)
        sleeps = 0  # synchronous sleeps this plan waited for (another host may fill the window again meanwhile)
        while True:
            lock.acquire()
            held = True
            try:
                current = self.store.current_id(agent_id)
                base = self._base(params, current)
                incoming = len(ids) + max_tokens
                fill = len(base.window) if base is not None else 0
                if base is not None and params.snapshot_id is None and self._must_sleep(fill, incoming):
                    if sleeps >= _MAX_SYNC_SLEEPS:
                        raise SleepFailed(f"agent {agent_id!r} still has no room after {sleeps} sleeps (other hosts "
                                          "keep filling its window); retry the turn")  # fmt: skip
                    lock.release()
                    held = False
                    sleeps += 1
                    try:
                        self.scheduler.sleep_now(agent_id)  # the only sleep on the response path (takes the lock)
                    except SleepFailed as e:
                        if not isinstance(e.__cause__, SnapshotConflict):
                            raise
                        # another host saved the agent meanwhile: look again (it may have slept it already)
                    continue
                if fill + incoming > self.L + 1:
                    raise WindowOverflow(
                        f"snapshot {base.record.id if base else None} holds {fill} window tokens; with this input "
                        f"({incoming} tokens incl. max_tokens) it exceeds the window L={self.L}; revive it and sleep "
                        "first"
                    )
                turn = Turn(params, ids, max_tokens, base, current or NO_SNAPSHOT, lock=lock)
                turn.body = self._compose(turn, body)
                return turn
            except BaseException:
                if held:
                    lock.release()
                raise

    def _base(self, params: AgentParams, current: str | None) -> Memory | None:
        """The memory a turn starts from: a named snapshot, zero (restore=false, or create for an unknown agent), or
        the agent's current memory — resident when ``current`` still names it, else loaded (a miss)."""
        if params.snapshot_id is not None:
            mem = self._snapshots.get(params.snapshot_id)
            if mem is None:
                mem = Memory.of(self.store.load(params.snapshot_id, fingerprint=self.fingerprint))
                self._snapshots.put(params.snapshot_id, mem)
            return mem
        if not params.restore or (current is None and params.create):
            return None
        if current is None:
            raise UnknownAgent(
                f"unknown agent {params.agent_id!r}: no snapshot in the store; send {FIELD}.create=true (or "
                "restore=false) to start a new agent"
            )
        return self._current(params.agent_id, current)

    def _current(self, agent_id: str, current: str) -> Memory:
        mem = self.resident.get(agent_id)
        if mem is not None and mem.record.id == current:
            self.stats["resident_hits"] += 1
            return mem
        mem = Memory.of(self.store.latest(agent_id, fingerprint=self.fingerprint))
        self.stats["store_loads"] += 1
        self.resident.put(agent_id, mem)
        return mem

    def _must_sleep(self, window_tokens: int, incoming: int) -> bool:
        limit = min(self.policy.window, self.L) + 1
        return window_tokens > 0 and window_tokens + incoming > limit

    def _compose(self, turn: Turn, body: dict[str, Any]) -> dict[str, Any]:
        base = turn.base
        out = {k: v for k, v in body.items() if k not in (FIELD, "prompt")}
        out["prompt"] = [self.bos, *(base.window if base is not None else ()), *turn.input_ids]
        out["max_tokens"] = turn.max_tokens
        out["return_token_ids"] = True  # the reply's token ids are what the turn saves
        if body.get("stream"):
            out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        kv = ConnectorParams(turn.agent_id, restore=False)
        if base is not None:
            kv = ConnectorParams(turn.agent_id, snapshot_id=base.record.id, state_key=base.key)
        out[FIELD] = kv.to_dict()
        return out

    def commit(self, turn: Turn, reply_ids: list[int], reply: dict[str, Any]) -> SnapshotRecord:
        """Save the turn: (S, window + input + reply), compare-and-set on the snapshot it started from. Raises
        `SnapshotConflict` (nothing written) when another writer moved the agent on meanwhile."""
        base = turn.base
        state = base.state if base is not None else self._zero
        window = [*(base.window if base is not None else ()), *turn.input_ids, *reply_ids]
        meta: dict[str, Any] = {
            "engine": "vllm-server",
            # the counters agentsleep.runtime.revive reads back, so any engine continues the agent's books
            "sleep_count": base.counter("sleep_count") if base is not None else 0,
            "tokens_seen": (base.counter("tokens_seen") if base is not None else 0) + len(turn.input_ids)
            + len(reply_ids),
        }  # fmt: skip
        if turn.params.turn_id is not None:
            meta["turn_id"] = turn.params.turn_id
            meta["turn"] = {"input": input_digest(turn.input_ids), **{k: reply.get(k) for k in REPLY_KEYS}}
            meta["turn"]["token_ids"] = reply_ids
        named = turn.params.snapshot_id is not None
        try:
            rec = self.store.save(
                turn.agent_id,
                state,
                window,
                reason="turn",
                passes=base.record.passes if base is not None else 1,
                tokens_consolidated=base.record.tokens_consolidated if base is not None else 0,
                parent_id=base.record.id if named and base is not None else None,  # None: the current snapshot
                metadata=meta,
                expect_current=turn.expect,
            )
        except SnapshotConflict:
            self.stats["conflicts"] += 1
            self.resident.pop(turn.agent_id)
            raise
        key = base.key if base is not None else self._zero_key
        self.resident.put(turn.agent_id, Memory(rec, state, tuple(window), key))
        return rec

    def release(self, turn: Turn, window_tokens: int | None) -> None:
        """After a turn attempt: release the agent and let the scheduler plan a background sleep (cheap)."""
        try:
            if turn.replay is None:
                self.scheduler.turn_finished(turn.agent_id, window_tokens=window_tokens)
            else:
                self.scheduler.turn_finished(turn.agent_id)
        finally:
            if turn.lock is not None:
                turn.lock.release()
                turn.lock = None

    # ------------------------------------------------------------------ sleeping (scheduler worker threads)

    def _sleep_job(self, request: SleepRequest) -> SleepOutcome:
        """Consolidate the agent's window (from its current memory) with N passes; save (S', carried tokens) with a
        compare-and-set. A conflict (another host saved meanwhile) raises, and the scheduler retries on the new
        memory."""
        agent_id = request.agent_id
        with self.agent_lock(agent_id):
            current = self.store.current_id(agent_id)
            if current is None:
                raise UnknownAgent(f"no agent {agent_id!r} in the store to sleep")
            mem = self._current(agent_id, current)
            window = list(mem.window)
            if not window:
                return SleepOutcome(snapshot_id=mem.record.id, passes=0, tokens=0)
            n = min(len(window), self.L)  # a window of L + 1 holds one waiting reply token: it opens the next one
            tokens = torch.tensor([window[:n]], dtype=torch.long, device=self.model.device)
            with torch.no_grad():
                state = self.model.sleep(tokens, mem.state.to(self.model.device), request.passes).to("cpu")
            meta = {"engine": "vllm-server", "sleep_count": mem.counter("sleep_count") + 1,
                    "tokens_seen": mem.counter("tokens_seen")}  # fmt: skip
            try:
                rec = self.store.save(
                    agent_id,
                    state,
                    window[n:],
                    reason="sleep",
                    passes=request.passes,
                    tokens_consolidated=mem.record.tokens_consolidated + n,
                    metadata=meta,
                    expect_current=mem.record.id,
                )
            except SnapshotConflict:
                self.resident.pop(agent_id)
                raise
            self.resident.put(agent_id, Memory(rec, state, tuple(window[n:]), state_key(state)))
        logger.info("agent %r slept: %d tokens, N=%d -> snapshot %s", agent_id, n, request.passes, rec.id)
        return SleepOutcome(snapshot_id=rec.id, passes=request.passes, tokens=n)


__all__ = ["DEFAULT_MAX_TOKENS", "UNSUPPORTED", "AgentTurns", "Memory", "Turn", "input_digest"]
