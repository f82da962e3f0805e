"""`TorchEngine`: the embedded, in-process engine — the reference every other engine is tested against.

Each live agent owns a `WindowCache` (the state its window started from, the window's K/V and pass-1 features) and a
lock. `observe` and `generate` run one pass per token through `SleepHybrid.extend`; when the window is full and more
tokens must go in, the call sleeps first (paper.md §5: "sleep whenever the window is full") and goes on in a new
window. That is the only sleep on the response path; the host (`agentsleep.memory.host`) schedules the others in the
background between turns through `sleep`.

A requested `sleep` never holds the agent while it works, so the agent keeps serving turns meanwhile: it freezes a
copy of the window, runs passes 2..N over its cached pass-1 features, builds the next window, calls ``persist`` (the
snapshot), and only then, locked for a moment, swaps the new memory in. A failure anywhere leaves the agent exactly as
it was. Tokens that arrived in the meantime are carried into the new window (replayed through pass 1). While a sleep
is being persisted nothing else may replace the window (an import, a window-full sleep, a checkpoint waits for it),
so the store never receives snapshots out of order; if the window was replaced while the sleep computed, its stale
result is dropped.

The last token `generate` emits joins the window but runs through the model only with the agent's next input: its
logits would predict the *next* turn, so computing them at once would put a pass on the response path for nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
import torch
from torch import Tensor

from agentsleep.errors import InvalidInput, SleepFailed, UnknownAgent, WindowOverflow
from agentsleep.model.hybrid import SleepHybrid, WindowCache
from agentsleep.model.state import FastWeights
from agentsleep.runtime.caches import batch_key, copy_cache, split_cache, stack_caches
from agentsleep.runtime.engine import (
    AgentMemory,
    AgentSession,
    GenerateRequest,
    Generation,
    ObserveResult,
    PersistMemory,
    PersistSleep,
    SamplingParams,
    SleepCommit,
    SleepResult,
    SleepTrigger,
    TokenIds,
    check_token_ids,
)
from agentsleep.runtime.sampling import sample_next
from agentsleep.runtime.text import TOKENIZER_FILE, TextCodec

if TYPE_CHECKING:
    from agentsleep.store import SnapshotStore

logger = logging.getLogger(__name__)

_AGENT_ID = re.compile(r"^\S.{0,127}$", re.DOTALL)  # non-empty, ≤ 128 chars (the store's id column), no leading space


def check_agent_id(agent_id: object) -> str:
    if not isinstance(agent_id, str) or not _AGENT_ID.match(agent_id):
        raise InvalidInput(f"agent id must be a non-empty str of at most 128 characters, got {agent_id!r}")
    return agent_id


@dataclass(eq=False)
class _Live:
    """One live agent. Every field is read and written with ``lock`` held."""

    agent_id: str
    cache: WindowCache
    window: list[int]  # real tokens already run through pass 1 in this window (≤ L)
    pending: list[int] = field(default_factory=list)  # taken in, not yet run (the last generated token)
    sleep_count: int = 0
    tokens_consolidated: int = 0
    tokens_seen: int = 0
    snapshot_id: str | None = None
    epoch: int = 0  # bumped whenever the window is replaced (sleep commit, import, removal)
    removed: bool = False
    committing: bool = False  # a requested sleep is persisting its result; the window may only grow meanwhile
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)


@dataclass(eq=False)
class _Stream:
    """One request inside `generate_batch`."""

    live: _Live
    prompt: list[int]
    sampling: SamplingParams
    generator: torch.Generator | None
    new: list[int] = field(default_factory=list)
    step_logits: list[Tensor] = field(default_factory=list)
    prompt_logits: list[Tensor] = field(default_factory=list)
    last: Tensor | None = None
    sleeps: int = 0
    done: bool = False


class TorchEngine:
    """Many agents on one in-process `SleepHybrid`.

    Args:
        model: the hybrid (put into eval mode; its weights are never changed).
        passes: default N for sleeps (default ``model.config.passes``).
        tokenizer: a `TextCodec`, a `tokenizers.Tokenizer`, or a path to ``tokenizer.json`` / a checkpoint directory;
            only needed for `encode` / `decode`.

    Thread safety: one lock per agent; any number of threads may drive different agents at once. The engine never
    changes torch's thread settings.
    """

    def __init__(
        self,
        model: SleepHybrid,
        *,
        passes: int | None = None,
        tokenizer: TextCodec | tokenizers.Tokenizer | str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(model, SleepHybrid):
            raise InvalidInput(f"TorchEngine needs a SleepHybrid, got {type(model).__name__}")
        self.model = model.eval()
        self._passes = self._check_passes(passes, model.config.passes)
        if tokenizer is None or isinstance(tokenizer, TextCodec):
            self.codec = tokenizer
        elif isinstance(tokenizer, tokenizers.Tokenizer):
            self.codec = TextCodec(tokenizer)
        else:
            self.codec = TextCodec.from_file(tokenizer)
        if self.codec is not None and self.codec.vocab_size > model.config.vocab_size:
            logger.warning(
                "tokenizer has %d ids but the model only %d: text using the extra ids will be rejected",
                self.codec.vocab_size,
                model.config.vocab_size,
            )
        self._agents: dict[str, _Live] = {}
        self._registry = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], *, passes: int | None = None, device: torch.device | str = "cpu"
    ) -> TorchEngine:
        """Load a checkpoint directory (``config.json``, ``model.safetensors``, and ``tokenizer.json`` if present)."""
        model = SleepHybrid.from_pretrained(path, device=device)
        tok = Path(path) / TOKENIZER_FILE
        return cls(model, passes=passes, tokenizer=tok if tok.is_file() else None)

    def __repr__(self) -> str:
        return f"TorchEngine(fingerprint={self.fingerprint!r}, L={self.window}, N={self.passes}, agents={len(self)})"

    def __len__(self) -> int:
        return len(self._agents)

    # ------------------------------------------------------------------ facts

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def window(self) -> int:
        return self.model.config.window

    @property
    def passes(self) -> int:
        return self._passes

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ text

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of a turn's text (see `TextCodec.encode` for what is rejected)."""
        if self.codec is None:
            raise InvalidInput(
                "this engine has no tokenizer: pass token ids, or load a checkpoint that holds tokenizer.json"
            )
        return check_token_ids(self.codec.encode(text), self.vocab_size, what="encoded text")

    def decode(self, ids: Sequence[int]) -> str:
        if self.codec is None:
            raise InvalidInput("this engine has no tokenizer: it cannot turn ids into text")
        return self.codec.decode(ids)

    # ------------------------------------------------------------------ agents

    def create_agent(self, agent_id: str) -> AgentSession:
        """A new agent with zero fast weights and an empty window (S is zero once per agent, paper §3.1).

        Raises:
            InvalidInput: the id is taken (use `import_state` to replace an agent's memory).
        """
        check_agent_id(agent_id)
        live = self._build(agent_id, AgentMemory(self.model.init_state(1)), snapshot_id=None)
        with self._registry:
            if agent_id in self._agents:
                raise InvalidInput(f"agent {agent_id!r} already exists; use import_state to replace its memory")
            self._agents[agent_id] = live
        return self._session(live)

    def has_agent(self, agent_id: str) -> bool:
        return agent_id in self._agents

    def agent_ids(self) -> list[str]:
        with self._registry:
            return sorted(self._agents)

    def remove_agent(self, agent_id: str) -> None:
        """Forget a live agent (its snapshots stay in any store). A sleep of it still computing is dropped."""
        with self._registry:
            live = self._agents.pop(agent_id, None)
        if live is None:
            raise UnknownAgent(f"no live agent {agent_id!r} in this engine")
        with live.lock:
            self._wait_commit(live)
            live.removed = True
            live.epoch += 1

    def session(self, agent_id: str) -> AgentSession:
        live = self._live(agent_id)
        with live.lock:
            self._check_alive(live)
            return self._session(live)

    # ------------------------------------------------------------------ wake

    def observe(
        self,
        agent_id: str,
        tokens: TokenIds,
        *,
        return_logits: bool = False,
        passes: int | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> ObserveResult:
        """Append tokens to the agent's window, one pass each; if the window fills, sleep and go on in a new one.

        Args:
            tokens: token ids (non-empty).
            return_logits: return ``logits[i]`` ([n, vocab], CPU) predicting the token after tokens[i].
            passes: N for a window-full sleep (default the engine's).
            on_sleep: persists a window-full sleep (see `PersistSleep`); if it raises, the sleep still commits
                (the call cannot go on otherwise) and the failure is logged.

        Raises:
            UnknownAgent, InvalidInput, SleepFailed (a window-full sleep could not be computed: the tokens before
            that window boundary were taken in, the rest were not).
        """
        ids = check_token_ids(tokens, self.vocab_size)
        N = self._check_passes(passes, self._passes)
        live = self._live(agent_id)
        with live.lock, torch.no_grad():
            self._check_alive(live)
            outs, _, sleeps = self._feed(live, ids, N, on_sleep, keep=return_logits)
            return ObserveResult(
                agent_id=agent_id,
                tokens=len(ids),
                sleeps=sleeps,
                window_tokens=len(live.window) + len(live.pending),
                logits=torch.cat(outs).cpu() if return_logits else None,
            )

    def generate(
        self,
        agent_id: str,
        prompt: TokenIds,
        sampling: SamplingParams | None = None,
        *,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
        passes: int | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> Generation:
        """Take the prompt in and generate up to ``sampling.max_new_tokens`` tokens, one pass per token (wake).

        Greedy by default; see `SamplingParams` for temperature / top-k / top-p / seed / stop tokens. ``generator``
        overrides ``sampling.seed``. Generated tokens join the window; when it fills mid-generation the call sleeps
        (N = ``passes``) and continues in the new window, exactly like `observe`.

        Raises:
            UnknownAgent, InvalidInput (empty prompt, bad ids or sampling parameters), SleepFailed.
        """
        sp = sampling or SamplingParams()
        ids = check_token_ids(prompt, self.vocab_size, what="prompt")
        check_token_ids(list(sp.stop_tokens), self.vocab_size, what="stop_tokens", allow_empty=True)
        N = self._check_passes(passes, self._passes)
        gen = generator if generator is not None else sp.make_generator()
        live = self._live(agent_id)
        with live.lock, torch.no_grad():
            self._check_alive(live)
            s = _Stream(live=live, prompt=ids, sampling=sp, generator=gen)
            self._prefill(s, N, on_sleep, return_logits)
            while not s.done:
                self._make_room(s, N, on_sleep)
                s.last = self._extend(live, [s.new[-1]])[-1]
                self._pick(s, return_logits)
            return self._result(s, return_logits)

    def generate_batch(
        self,
        requests: Sequence[GenerateRequest],
        *,
        return_logits: bool = False,
        passes: int | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> list[Generation]:
        """`generate` for several agents at once: prompts are taken in one agent at a time (their lengths differ),
        then the decode steps of agents whose windows have the same shape run as one batch.

        Gives the same tokens as calling `generate` per request (logits agree to float rounding: a batched matmul
        may round differently). Each agent appears at most once. See docs/runtime.md for when it pays.
        """
        if not requests:
            return []
        ids_seen = [r.agent_id for r in requests]
        if len(set(ids_seen)) != len(ids_seen):
            raise InvalidInput("generate_batch: each agent may appear only once per batch")
        N = self._check_passes(passes, self._passes)
        streams = []
        for r in requests:
            sp = r.sampling
            check_token_ids(list(sp.stop_tokens), self.vocab_size, what="stop_tokens", allow_empty=True)
            prompt = check_token_ids(r.prompt, self.vocab_size, what=f"prompt of {r.agent_id!r}")
            gen = r.generator if r.generator is not None else sp.make_generator()
            streams.append(_Stream(live=self._live(r.agent_id), prompt=prompt, sampling=sp, generator=gen))
        with contextlib.ExitStack() as locks, torch.no_grad():
            for s in sorted(streams, key=lambda s: s.live.agent_id):  # one global order: no deadlock
                locks.enter_context(s.live.lock)
                self._check_alive(s.live)
            for s in streams:
                self._prefill(s, N, on_sleep, return_logits)
            while True:
                active = [s for s in streams if not s.done]
                if not active:
                    break
                groups: dict[tuple[int, int, int], list[_Stream]] = defaultdict(list)
                for s in active:
                    self._make_room(s, N, on_sleep)
                    groups[batch_key(s.live.cache)].append(s)
                for group in groups.values():
                    self._step_group(group)
                for s in active:
                    self._pick(s, return_logits)
            return [self._result(s, return_logits) for s in streams]

    # ------------------------------------------------------------------ sleep

    def sleep(self, agent_id: str, passes: int | None = None, *, persist: PersistSleep | None = None) -> SleepResult:
        """Consolidate the agent's window into S with N passes and clear the window.

        Works without holding the agent (turns go on meanwhile): computes, builds the next window, calls ``persist``,
        and only then swaps the new memory in. If the computation or ``persist`` raises, the exception propagates
        and the agent keeps its old memory, so the caller may simply retry. An empty window is not slept
        (``skipped="empty"``); a window replaced while the sleep computed drops the result (``"superseded"``).

        Raises:
            UnknownAgent, InvalidInput (passes < 1), and whatever the model or ``persist`` raised.
        """
        N = self._check_passes(passes, self._passes)
        live = self._live(agent_id)
        t0 = time.perf_counter()
        with live.lock, torch.no_grad():
            self._check_alive(live)
            self._wait_commit(live)
            if live.pending and len(live.window) + len(live.pending) <= self.window:
                self._extend(live, [])  # the waiting token joins this window before it is consolidated
            if not live.window:
                return SleepResult(agent_id, N, 0, "empty", None, time.perf_counter() - t0)
            frozen, epoch, n = copy_cache(live.cache), live.epoch, len(live.window)
        with torch.no_grad():
            new_state = self.model.sleep_window(frozen, N)  # passes 2..N over the frozen window's pass-1 features
        with live.lock:
            self._wait_commit(live)
            if live.epoch != epoch or live.removed:
                logger.info("sleep of agent %r superseded while it computed; result dropped", agent_id)
                return SleepResult(agent_id, N, 0, "superseded", None, time.perf_counter() - t0)
            tail = live.window[n:] + live.pending
            memory = AgentMemory(
                state=new_state,
                window=tuple(tail),
                tokens_consolidated=live.tokens_consolidated + n,
                sleep_count=live.sleep_count + 1,
                tokens_seen=live.tokens_seen,
            )
            live.committing = True  # from here until the swap, the window may only grow
        try:
            with torch.no_grad():
                cache, run, wait = self._open_window(new_state, tail)
            sid = persist(SleepCommit(agent_id, memory, N, n, "sleep")) if persist is not None else None
        except BaseException:
            with live.lock:
                live.committing = False
                live.cond.notify_all()
            raise
        with live.lock, torch.no_grad():
            try:
                late = live.window[n:] + live.pending
                if len(late) > len(tail):  # tokens taken in while persisting: bring the new window up to date
                    if len(late) <= self.window:
                        self.model.extend(cache, self._ids(late[len(tail) :]))
                        run, wait = late, []
                    else:
                        cache, run, wait = self._open_window(new_state, late)
                live.cache, live.window, live.pending = cache, run, wait
                live.epoch += 1
                live.sleep_count += 1
                live.tokens_consolidated += n
                if sid is not None:
                    live.snapshot_id = sid
            finally:
                live.committing = False
                live.cond.notify_all()
        return SleepResult(agent_id, N, n, None, sid, time.perf_counter() - t0, carried=len(late))

    # ------------------------------------------------------------------ memory in and out

    def export_state(self, agent_id: str) -> AgentMemory:
        """The agent's memory now: the state its window started from (a copy) and the window's tokens."""
        live = self._live(agent_id)
        with live.lock:
            self._check_alive(live)
            return self._memory(live)

    def checkpoint(self, agent_id: str, persist: PersistMemory) -> str | None:
        """Call ``persist`` with the agent's current memory (agent locked, so nothing changes in between) and record
        the snapshot id it returns as the agent's current one."""
        live = self._live(agent_id)
        with live.lock:
            self._check_alive(live)
            self._wait_commit(live)  # a sleep's snapshot is on its way: this one must come after it
            sid = persist(self._memory(live))
            if sid is not None:
                live.snapshot_id = sid
            return sid

    def import_state(self, agent_id: str, memory: AgentMemory, *, snapshot_id: str | None = None) -> AgentSession:
        """Make ``memory`` the agent's memory (creating the agent if needed): open a window on ``memory.state`` and
        replay ``memory.window`` through pass 1. A sleep of the agent still computing is dropped.

        Raises:
            SnapshotMismatch: the state belongs to another model or does not fit it.
            WindowOverflow: the window holds more than L tokens (+ one waiting token).
            InvalidInput: bad agent id, not an `AgentMemory`, bad token ids.
        """
        check_agent_id(agent_id)
        fresh = self._build(agent_id, memory, snapshot_id=snapshot_id)
        while True:
            live = self._agents.get(agent_id)
            if live is None:
                with self._registry:
                    if agent_id not in self._agents:
                        self._agents[agent_id] = fresh
                        return self._session(fresh)
                continue  # someone created it meanwhile: replace that one in place
            with live.lock:
                self._wait_commit(live)
                if live.removed:
                    continue  # removed meanwhile: insert ours
                live.cache, live.window, live.pending = fresh.cache, fresh.window, fresh.pending
                live.sleep_count, live.tokens_consolidated = fresh.sleep_count, fresh.tokens_consolidated
                live.tokens_seen, live.snapshot_id = fresh.tokens_seen, fresh.snapshot_id
                live.epoch += 1
                return self._session(live)

    def revive(self, agent_id: str, store: SnapshotStore, snapshot_id: str | None = None) -> AgentSession:
        """Load the agent from ``store`` (its latest snapshot, or ``snapshot_id``) into this engine."""
        from agentsleep.runtime.revive import revive

        return revive(self, store, agent_id, snapshot_id)

    # ------------------------------------------------------------------ internals (agent lock held)

    @staticmethod
    def _check_passes(passes: int | None, default: int) -> int:
        n = default if passes is None else passes
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput(f"passes must be an int >= 1, got {passes!r}")
        return n

    def _live(self, agent_id: str) -> _Live:
        live = self._agents.get(agent_id)
        if live is None:
            raise UnknownAgent(
                f"no live agent {agent_id!r} in this engine; create_agent() it, or revive it from a snapshot store"
            )
        return live

    @staticmethod
    def _check_alive(live: _Live) -> None:
        if live.removed:
            raise UnknownAgent(f"agent {live.agent_id!r} was removed from this engine")

    @staticmethod
    def _wait_commit(live: _Live) -> None:
        """Wait (lock released meanwhile) until no requested sleep is persisting for this agent."""
        while live.committing:
            live.cond.wait()
        TorchEngine._check_alive(live)

    def _ids(self, ids: list[int]) -> Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _open_window(self, state: FastWeights, tail: list[int]) -> tuple[WindowCache, list[int], list[int]]:
        """A window opened on ``state`` with ``tail`` replayed: (cache, tokens run, token left waiting past L)."""
        cache = self.model.start_window(state)
        run, wait = tail[: self.window], tail[self.window :]
        if run:
            self.model.extend(cache, self._ids(run))
        return cache, run, wait

    @staticmethod
    def _session(live: _Live) -> AgentSession:
        return AgentSession(
            agent_id=live.agent_id,
            window=tuple(live.window + live.pending),
            sleep_count=live.sleep_count,
            snapshot_id=live.snapshot_id,
            tokens_consolidated=live.tokens_consolidated,
            tokens_seen=live.tokens_seen,
        )

    @staticmethod
    def _memory(live: _Live) -> AgentMemory:
        return AgentMemory(
            state=live.cache.state.clone(),
            window=tuple(live.window + live.pending),
            tokens_consolidated=live.tokens_consolidated,
            sleep_count=live.sleep_count,
            tokens_seen=live.tokens_seen,
        )

    def _build(self, agent_id: str, memory: AgentMemory, snapshot_id: str | None) -> _Live:
        """A live agent from a memory: open a window on its state and replay its tokens (one prefill)."""
        if not isinstance(memory, AgentMemory):
            raise InvalidInput(f"memory must be an AgentMemory, got {type(memory).__name__}")
        self.model.check_state(memory.state, batch=1)
        window = check_token_ids(memory.window, self.vocab_size, what="memory.window", allow_empty=True)
        L = self.window
        if len(window) > L + 1:
            raise WindowOverflow(
                f"memory.window holds {len(window)} tokens but a window holds L={L} (+1 waiting): it is not a "
                "memory of this model's windows"
            )
        with torch.no_grad():
            cache, run, wait = self._open_window(memory.state.to(self.device), window)
        return _Live(
            agent_id=agent_id,
            cache=cache,
            window=run,
            pending=wait,
            sleep_count=memory.sleep_count,
            tokens_consolidated=memory.tokens_consolidated,
            tokens_seen=max(memory.tokens_seen, memory.tokens_consolidated + len(window)),
            snapshot_id=snapshot_id,
        )

    def _extend(self, live: _Live, ids: list[int]) -> Tensor:
        """Run the waiting token(s) and ``ids`` through pass 1; return the logits of ``ids`` ([len(ids), V]).

        Works on a copy and swaps it in at the end, so an exception leaves the agent as it was.
        """
        todo = live.pending + ids
        cache = copy_cache(live.cache)
        logits = self.model.extend(cache, self._ids(todo))[0]
        live.cache = cache
        live.window.extend(todo)
        waited = len(live.pending)
        live.pending = []
        live.tokens_seen += len(ids)
        return logits[waited:]

    def _feed(
        self, live: _Live, ids: list[int], passes: int, on_sleep: PersistSleep | None, *, keep: bool
    ) -> tuple[list[Tensor], Tensor | None, int]:
        """Take ``ids`` in, sleeping whenever the window is full. Returns (logits pieces if ``keep``, logits of the
        last id, window-full sleeps)."""
        L = self.window
        sleeps = 0
        while len(live.window) + len(live.pending) > L:  # a waiting token that no longer fits opens the next window
            sleeps += self._forced_sleep(live, passes, on_sleep, taken=0, total=len(ids))
        outs: list[Tensor] = []
        last: Tensor | None = None
        pos = 0
        while pos < len(ids):
            room = L - len(live.window) - len(live.pending)
            if room <= 0:
                if live.pending:
                    self._extend(live, [])  # the waiting token still fits the old window
                sleeps += self._forced_sleep(live, passes, on_sleep, taken=pos, total=len(ids))
                continue
            lg = self._extend(live, ids[pos : pos + room])
            if keep:
                outs.append(lg)
            last = lg[-1]
            pos += min(room, len(ids) - pos)
        return outs, last, sleeps

    def _forced_sleep(self, live: _Live, passes: int, on_sleep: PersistSleep | None, *, taken: int, total: int) -> int:
        """The window is full and more must go in: sleep now, on the caller's time (the one synchronous sleep).

        If a requested sleep is just persisting its result, wait for it instead (it empties the window) and return 0;
        the caller looks at the window again.
        """
        if live.committing:
            self._wait_commit(live)
            return 0
        n = len(live.window)
        try:
            new_state = self.model.sleep_window(live.cache, passes)
            self._commit(live, new_state, n, list(live.pending), passes, "window_full", on_sleep, True)
        except Exception as e:
            raise SleepFailed(
                f"agent {live.agent_id!r}: the window is full and its sleep failed ({type(e).__name__}: {e}); "
                f"{taken} of {total} tokens were taken in, the agent keeps its last good state"
            ) from e
        logger.debug("agent %r slept on a full window (%d tokens, N=%d)", live.agent_id, n, passes)
        return 1

    def _commit(
        self,
        live: _Live,
        new_state: FastWeights,
        n: int,
        tail: list[int],
        passes: int,
        trigger: SleepTrigger,
        persist: PersistSleep | None,
        tolerate_persist_failure: bool,
    ) -> str | None:
        """Open the next window on ``new_state`` with ``tail`` replayed, persist, then swap (plain assignments)."""
        cache, run, wait = self._open_window(new_state, tail)
        sid = None
        if persist is not None:
            commit = SleepCommit(
                agent_id=live.agent_id,
                memory=AgentMemory(
                    state=new_state,
                    window=tuple(tail),
                    tokens_consolidated=live.tokens_consolidated + n,
                    sleep_count=live.sleep_count + 1,
                    tokens_seen=live.tokens_seen,
                ),
                passes=passes,
                tokens=n,
                trigger=trigger,
            )
            try:
                sid = persist(commit)
            except Exception:
                if not tolerate_persist_failure:
                    raise
                logger.warning(
                    "agent %r: persisting its window-full sleep failed; the sleep stands, the store lags until the "
                    "next snapshot",
                    live.agent_id,
                    exc_info=True,
                )
        live.cache, live.window, live.pending = cache, run, wait
        live.epoch += 1
        live.sleep_count += 1
        live.tokens_consolidated += n
        if sid is not None:
            live.snapshot_id = sid
        return sid

    # -------------------------------------------------------- generation steps (agent lock held)

    def _prefill(self, s: _Stream, passes: int, on_sleep: PersistSleep | None, keep: bool) -> None:
        outs, s.last, s.sleeps = self._feed(s.live, s.prompt, passes, on_sleep, keep=keep)
        s.prompt_logits = outs
        if s.sampling.max_new_tokens == 0:
            s.done = True
        else:
            self._pick(s, keep)

    def _pick(self, s: _Stream, keep: bool) -> None:
        """Draw the next token from ``s.last``; the last one of a generation waits in the window (see module doc)."""
        assert s.last is not None
        tok = sample_next(s.last, s.sampling, s.generator)
        s.new.append(tok)
        if keep:
            s.step_logits.append(s.last)
        if tok in s.sampling.stop_tokens or len(s.new) >= s.sampling.max_new_tokens:
            s.live.pending.append(tok)
            s.live.tokens_seen += 1
            s.done = True

    def _make_room(self, s: _Stream, passes: int, on_sleep: PersistSleep | None) -> None:
        live = s.live
        while len(live.window) + len(live.pending) >= self.window:
            s.sleeps += self._forced_sleep(live, passes, on_sleep, taken=len(s.prompt), total=len(s.prompt))

    def _step_group(self, group: list[_Stream]) -> None:
        """Feed each stream's newest token; agents with equal window shapes share one batched pass."""
        if len(group) == 1:
            s = group[0]
            s.last = self._extend(s.live, [s.new[-1]])[-1]
            return
        caches = [s.live.cache for s in group]
        batched = stack_caches(caches)
        toks = torch.tensor([[s.new[-1]] for s in group], dtype=torch.long, device=self.device)
        logits = self.model.extend(batched, toks)[:, -1]  # [n, V]
        for i, s in enumerate(group):
            s.live.cache = split_cache(batched, i, caches[i])
            s.live.window.append(s.new[-1])
            s.live.tokens_seen += 1
            s.last = logits[i]

    def _result(self, s: _Stream, keep: bool) -> Generation:
        stop = bool(s.new) and s.new[-1] in s.sampling.stop_tokens
        return Generation(
            agent_id=s.live.agent_id,
            tokens=tuple(s.new),
            stop_reason="stop" if stop else "length",
            prompt_tokens=len(s.prompt),
            sleeps=s.sleeps,
            window_tokens=len(s.live.window) + len(s.live.pending),
            logits=torch.stack(s.step_logits).cpu() if keep and s.step_logits else None,
            prompt_logits=torch.cat(s.prompt_logits).cpu() if keep else None,
        )


__all__ = ["TorchEngine", "check_agent_id"]
