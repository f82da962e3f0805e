"""`AgentHost`: an engine, a snapshot store, a sleep policy and a scheduler, combined into agents that live for
thousands of turns with bounded latency and memory.

A turn (`AgentHost.turn`):

1. the input is validated and tokenised (empty text, non-UTF-8 bytes, bad ids → `InvalidInput`);
2. if it cannot fit beside the window, the turn waits for one sleep (the only sleep on the response path); an input
   longer than the window is split automatically: window-sized pieces are taken in with a sleep between them;
3. the engine takes the input in and generates the reply (one pass per token; if the window fills mid-reply the
   engine sleeps and goes on, persisting that sleep too);
4. at the end the scheduler is told the window size, and sleeps in the background once the policy's soft threshold
   is reached (or after ``idle_seconds`` without a turn). Each sleep is snapshotted to the store.

Failure policy: a background sleep that fails leaves the agent's last good state (the engine swaps only after the
snapshot is saved) and is retried by the scheduler with backoff; it never fails a turn. A turn that needs room but
whose sleep fails falls back to the engine's window-full sleep, which commits even if saving its snapshot fails; the
agent is then marked *unsaved* and a background job re-saves its memory (reason "resync", retried like a sleep) until
the store has caught up. Only a sleep whose *computation* fails while the window is full fails the turn, with
`SleepFailed`: there is then no way to take the input in.

Over-long turns are split rather than rejected: an agent reading a long tool output should not fail, and the paper's
own rule for a stream longer than the window is "sleep whenever the window is full" (paper.md §5).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import torch

from agentsleep.errors import ConfigError, InvalidInput, SleepFailed, UnknownAgent
from agentsleep.memory.policy import SleepPolicy
from agentsleep.memory.scheduler import SleepHandle, SleepOutcome, SleepRecord, SleepRequest, SleepScheduler
from agentsleep.runtime.engine import AgentMemory, AgentSession, Engine, SamplingParams, SleepCommit, check_token_ids
from agentsleep.runtime.revive import revive, save_memory
from agentsleep.store import SnapshotStore

logger = logging.getLogger(__name__)

Message = str | bytes | Sequence[int] | torch.Tensor
_MAX_STALLED_SLEEPS = 3  # sync sleeps in a row that free no room before the engine's window-full sleeps take over


@dataclass(frozen=True, slots=True)
class TurnResult:
    """One turn's outcome.

    ``input_logits[i]`` ([n_input, vocab]) predicts the token after input token i; ``logits[j]`` ([n_reply, vocab])
    is the distribution reply token j was drawn from (both only with ``return_logits``).
    """

    agent_id: str
    tokens: tuple[int, ...]  # the reply
    text: str | None  # the reply decoded, when the input was text
    stop_reason: Literal["stop", "length"]
    input_tokens: int
    window_tokens: int  # after the turn (and after an in-turn sleep, when sleeping is not in the background)
    sync_sleeps: int  # sleeps this turn waited for
    seconds: float  # the turn's latency as the caller saw it (background sleeps excluded)
    snapshot_id: str | None  # the agent's current snapshot after the turn
    background_sleep: SleepHandle | None = None  # the sleep the scheduler queued after this turn, if any
    input_logits: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class AgentHost:
    """Live agents on one engine, persisted to one store, slept by one policy.

    Args:
        engine: the model runner (`TorchEngine` or any `Engine`).
        store: where snapshots go (None: agents live only in memory; `revive` then needs a store).
        policy: when and how hard to sleep (default: the engine's window and passes, other fields default).
            ``policy.window`` may be smaller than the model's L (sleep earlier), never larger.
        background: sleep in the background between turns (default). False puts the policy's sleep at the end of
            the turn that reaches the threshold, on the response path: deterministic (tests) and the benchmark's
            comparison point.
        snapshot_turns: also snapshot after every turn (reason "turn"), so a crash loses no turn; costs one store
            write per turn. Off by default: snapshots after sleeps bound the loss to one window.
        max_workers: background sleeps that may run at once.
        clock: the scheduler's clock (`ManualClock` in tests).

    Thread safety: any number of threads may drive any agents; turns of one agent are serialised.
    """

    def __init__(
        self,
        engine: Engine,
        store: SnapshotStore | None = None,
        policy: SleepPolicy | None = None,
        *,
        background: bool = True,
        snapshot_turns: bool = False,
        max_workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.store = store
        self.policy = policy or SleepPolicy(window=engine.window, passes=engine.passes)
        if self.policy.window > engine.window:
            raise ConfigError(
                f"policy.window={self.policy.window} exceeds the model's window L={engine.window}; "
                "a window can never hold more than L tokens"
            )
        self.background = background
        self.snapshot_turns = snapshot_turns
        self.scheduler = SleepScheduler(self._sleep_job, self.policy, max_workers=max_workers, clock=clock)
        self._turn_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._unsaved: set[str] = set()  # agents whose live memory is ahead of the store (a save failed)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> AgentHost:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self, *, wait: bool = True) -> None:
        """Stop the scheduler; with ``wait``, pending sleeps run (and are snapshotted) first. The store stays open."""
        self.scheduler.shutdown(wait=wait)

    def flush(self, timeout: float | None = None) -> bool:
        """Run every pending sleep now and wait for them; False on timeout."""
        return self.scheduler.flush(timeout)

    # ------------------------------------------------------------------ agents

    def create(self, agent_id: str) -> AgentSession:
        """A new agent (zero fast weights); with a store, its first snapshot (reason "create") is saved at once.

        Raises:
            InvalidInput: the agent already exists here or in the store (revive it instead).
        """
        if self.store is not None:
            try:
                self.store.agent(agent_id)
            except UnknownAgent:
                pass
            else:
                raise InvalidInput(f"agent {agent_id!r} already exists in the snapshot store; revive it instead")
        self.engine.create_agent(agent_id)
        if self.store is not None:
            self._checkpoint(agent_id, "create", swallow=False)
        return self.engine.session(agent_id)

    def revive(self, agent_id: str, snapshot_id: str | None = None) -> AgentSession:
        """Load the agent from the store (latest snapshot, or ``snapshot_id``); it continues exactly from there."""
        if self.store is None:
            raise InvalidInput("this host has no snapshot store to revive from")
        with self._turn_lock(agent_id):
            return revive(self.engine, self.store, agent_id, snapshot_id)

    def remove(self, agent_id: str) -> None:
        """Take the agent out of the engine (its snapshots stay in the store)."""
        with self._turn_lock(agent_id):
            self.engine.remove_agent(agent_id)
        self.scheduler.forget(agent_id)

    def session(self, agent_id: str) -> AgentSession:
        return self.engine.session(agent_id)

    def snapshot(self, agent_id: str, reason: str = "manual") -> str:
        """Save the agent's current memory now and return the snapshot id."""
        if self.store is None:
            raise InvalidInput("this host has no snapshot store")
        sid = self._checkpoint(agent_id, reason, swallow=False)
        assert sid is not None
        return sid

    def sleep_now(self, agent_id: str, *, timeout: float | None = None) -> SleepRecord:
        """Sleep the agent now, through the scheduler (snapshotted, recorded). Raises `SleepFailed`."""
        self.engine.session(agent_id)  # UnknownAgent before anything is scheduled
        return self.scheduler.sleep_now(agent_id, timeout=timeout)

    def request_sleep(self, agent_id: str, *, delay: float = 0.0) -> SleepHandle:
        """Ask for a background sleep of the agent after ``delay`` seconds (never raises for its failure)."""
        self.engine.session(agent_id)
        return self.scheduler.schedule(agent_id, delay=delay, reason="manual")

    # ------------------------------------------------------------------ turns

    def turn(
        self,
        agent_id: str,
        message: Message,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: Sequence[int] = (),
        return_logits: bool = False,
    ) -> TurnResult:
        """Take ``message`` in and generate a reply (``max_new_tokens=0``: take it in only, e.g. a tool result).

        ``message`` is text (str, or UTF-8 bytes; needs the engine's tokenizer) or token ids. An agent that is not
        live but exists in the store is revived first.

        Raises:
            InvalidInput: empty or undecodable input, bad ids, bad sampling parameters.
            UnknownAgent: the agent is neither live nor in the store.
            SleepFailed: only when the window is full and its sleep cannot even be computed.
        """
        sampling = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_tokens=tuple(stop_tokens),
        )
        ids, as_text = self._encode(message)
        with self._turn_lock(agent_id):
            self._ensure_live(agent_id)
            t0 = time.perf_counter()
            if self.background:
                self.scheduler.notify_turn(agent_id)
            handle = None
            try:
                prompt, syncs, in_logits = self._take_in(agent_id, ids, return_logits)
                gen = self.engine.generate(
                    agent_id,
                    prompt,
                    sampling,
                    return_logits=return_logits,
                    passes=self.policy.passes,
                    on_sleep=self._persist_sleep if self._snapshots_on_sleep else None,
                )
                syncs += gen.sleeps
                if return_logits and gen.prompt_logits is not None:
                    in_logits.append(gen.prompt_logits)
                if not self.background and self.policy.should_sleep_after_turn(gen.window_tokens):
                    syncs += self._sync_sleep(agent_id)
                if self.snapshot_turns and self.store is not None:
                    self._checkpoint(agent_id, "turn", swallow=True)
                seconds = time.perf_counter() - t0
            finally:
                if self.background:
                    handle = self.scheduler.turn_finished(agent_id, window_tokens=self._window_tokens(agent_id))
                    if handle is None and agent_id in self._unsaved:
                        # Below the threshold the job does not sleep; for an unsaved agent it re-saves the memory,
                        # with the scheduler's retries and backoff.
                        handle = self.scheduler.schedule(agent_id, reason="threshold")
                elif agent_id in self._unsaved:
                    self._checkpoint(agent_id, "resync", swallow=True)
        session = self.engine.session(agent_id)
        return TurnResult(
            agent_id=agent_id,
            tokens=gen.tokens,
            text=self.engine.decode(gen.tokens) if as_text else None,
            stop_reason=gen.stop_reason,
            input_tokens=len(ids),
            window_tokens=session.window_tokens,
            sync_sleeps=syncs,
            seconds=seconds,
            snapshot_id=session.snapshot_id,
            background_sleep=handle,
            input_logits=torch.cat(in_logits) if return_logits else None,
            logits=gen.logits,
        )

    def observe(self, agent_id: str, message: Message, *, return_logits: bool = False) -> TurnResult:
        """A turn without a reply (a tool result, a document): `turn` with ``max_new_tokens=0``."""
        return self.turn(agent_id, message, max_new_tokens=0, return_logits=return_logits)

    # ------------------------------------------------------------------ internals

    @property
    def _snapshots_on_sleep(self) -> bool:
        return self.store is not None and self.policy.snapshot_after_sleep

    def _turn_lock(self, agent_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._turn_locks.setdefault(agent_id, threading.Lock())

    def _encode(self, message: Message) -> tuple[list[int], bool]:
        if isinstance(message, str | bytes | bytearray | memoryview):
            return self.engine.encode(bytes(message) if not isinstance(message, str) else message), True
        return check_token_ids(message, self.engine.vocab_size, what="turn"), False

    def _ensure_live(self, agent_id: str) -> None:
        if self.engine.has_agent(agent_id):
            return
        if self.store is None:
            raise UnknownAgent(f"no agent {agent_id!r}; create it with host.create({agent_id!r})")
        try:
            revive(self.engine, self.store, agent_id)
        except UnknownAgent as e:
            raise UnknownAgent(
                f"no agent {agent_id!r} in this host or its snapshot store; create it with host.create({agent_id!r})"
            ) from e

    def _window_tokens(self, agent_id: str) -> int | None:
        try:
            return self.engine.session(agent_id).window_tokens
        except UnknownAgent:
            return None

    def _take_in(self, agent_id: str, ids: list[int], keep: bool) -> tuple[list[int], int, list[torch.Tensor]]:
        """Make room for the input: sleep once if it cannot fit beside the window; take in window-sized pieces of an
        input longer than the window. Returns (the rest, which fits: the prompt; sleeps waited for; logits)."""
        L = self.policy.window
        on_sleep = self._persist_sleep if self._snapshots_on_sleep else None
        pos, syncs, stalled = 0, 0, 0
        logits: list[torch.Tensor] = []
        while True:
            rest = len(ids) - pos
            w = self.engine.session(agent_id).window_tokens
            if w + rest <= L:
                break
            if w > 0:
                if stalled >= _MAX_STALLED_SLEEPS or not self._sync_sleep(agent_id):
                    # Sleeping fails (or frees nothing): hand the rest to the engine, whose window-full sleeps
                    # commit even when their snapshot cannot be saved.
                    break
                syncs += 1
                stalled = stalled + 1 if self.engine.session(agent_id).window_tokens >= w else 0
                continue
            piece = ids[pos : pos + L]  # an empty window and still too long: fill one whole window
            out = self.engine.observe(agent_id, piece, return_logits=keep, passes=self.policy.passes, on_sleep=on_sleep)
            syncs += out.sleeps
            if keep and out.logits is not None:
                logits.append(out.logits)
            pos += len(piece)
        return ids[pos:], syncs, logits

    def _sync_sleep(self, agent_id: str) -> int:
        """One sleep on the turn's time, through the scheduler. 1 if it succeeded, 0 if it failed (logged)."""
        try:
            self.scheduler.sleep_now(agent_id)
        except SleepFailed as e:
            logger.warning("agent %r: %s; the turn goes on", agent_id, e)
            return 0
        return 1

    def _persist_sleep(self, commit: SleepCommit) -> str | None:
        assert self.store is not None
        try:
            record = save_memory(
                self.store,
                commit.agent_id,
                commit.memory,
                reason="sleep",
                passes=commit.passes,
                metadata={"trigger": commit.trigger, "window_tokens_slept": commit.tokens},
            )
        except Exception:
            if commit.trigger == "window_full":  # the engine commits this sleep anyway: the store now lags
                self._unsaved.add(commit.agent_id)
            raise
        self._unsaved.discard(commit.agent_id)
        return record.id

    def _checkpoint(self, agent_id: str, reason: str, *, swallow: bool) -> str | None:
        store = self.store
        assert store is not None

        def persist(memory: AgentMemory) -> str:
            return save_memory(store, agent_id, memory, reason=reason, passes=self.policy.passes).id

        try:
            sid = self.engine.checkpoint(agent_id, persist)
        except Exception:
            if not swallow:
                raise
            self._unsaved.add(agent_id)
            logger.warning("agent %r: %s snapshot failed; the turn stands", agent_id, reason, exc_info=True)
            return None
        self._unsaved.discard(agent_id)
        return sid

    def _sleep_job(self, request: SleepRequest) -> SleepOutcome:
        """The scheduler's `SleepJob`: sleep the agent, snapshot the result, then swap (see `TorchEngine.sleep`)."""
        agent_id = request.agent_id
        try:
            if request.reason == "threshold":
                # A threshold sleep queued before a window-full sleep or a concurrent sleep emptied the window would
                # otherwise consolidate a nearly empty window.
                w = self.engine.session(agent_id).window_tokens
                if not self.policy.should_sleep_after_turn(w):
                    return SleepOutcome(
                        snapshot_id=self._resync(agent_id, request),
                        tokens=0,
                        detail={"skipped": "below threshold", "window_tokens": w},
                    )
            persist = self._persist_sleep if (request.snapshot and self.store is not None) else None
            result = self.engine.sleep(agent_id, request.passes, persist=persist)
            detail: dict[str, object] = {"seconds": result.seconds, "carried": result.carried}
            sid = result.snapshot_id
            if result.skipped:
                detail["skipped"] = result.skipped
                sid = self._resync(agent_id, request)
        except UnknownAgent:
            return SleepOutcome(tokens=0, detail={"skipped": "agent removed"})
        return SleepOutcome(snapshot_id=sid, passes=result.passes, tokens=result.tokens, detail=detail)

    def _resync(self, agent_id: str, request: SleepRequest) -> str | None:
        """Re-save an unsaved agent's memory (raises on failure, so the scheduler retries with backoff)."""
        if agent_id not in self._unsaved or not request.snapshot or self.store is None:
            return None
        sid = self._checkpoint(agent_id, "resync", swallow=False)
        logger.info("agent %r: the store caught up with its memory (snapshot %s)", agent_id, sid)
        return sid


__all__ = ["AgentHost", "Message", "TurnResult"]
