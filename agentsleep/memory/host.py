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

Every save is a compare-and-set on the snapshot the agent's live memory descends from (the one the host loaded or
last saved), so a newer snapshot written by someone else — a sleep worker consolidating the agent, another host — is
never overwritten. On a conflict the host looks at what landed: a consolidation of its base (sleeps only, the same
tokens) is merged — the newer S is loaded and the tokens the host took in since its base are replayed on top (the
host journals them until a save holds them) — and the save is retried; anything else raises `SnapshotConflict`
rather than guess. Lineage, ``tokens_consolidated`` and ``sleep_count`` therefore never go backwards in the store.

Parking (`park`, `remove`) saves what the agent took in since its last snapshot before it leaves the engine, so a
parked agent loses nothing, whatever ``snapshot_turns`` says; `park` can also queue its sleep for the sleep workers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import torch

from agentsleep.errors import ConfigError, InvalidInput, SleepFailed, SnapshotConflict, UnknownAgent
from agentsleep.memory.policy import SleepPolicy
from agentsleep.memory.scheduler import SleepHandle, SleepOutcome, SleepRecord, SleepRequest, SleepScheduler
from agentsleep.runtime.engine import AgentMemory, AgentSession, Engine, SamplingParams, SleepCommit, check_token_ids
from agentsleep.runtime.revive import memory_from_snapshot, revive, save_memory, window_limit
from agentsleep.store import SleepJobRecord, SnapshotRecord, SnapshotStore

logger = logging.getLogger(__name__)

Message = str | bytes | Sequence[int] | torch.Tensor
_MAX_STALLED_SLEEPS = 3  # sync sleeps in a row that free no room before the engine's window-full sleeps take over
_MERGE_TRIES = 3  # merges of another writer's consolidation per save before giving up with SnapshotConflict
_MERGE_DEPTH = 16  # snapshots walked back from the store's current one looking for the host's base
_JOURNAL_WINDOWS = 64  # a journal longer than this many windows is dropped (the store has been away for long)


@dataclass(eq=False)
class _Book:
    """What the host knows about a live agent's place in the store, read and written under ``AgentHost._books``.

    ``base_id``: the snapshot the live memory descends from (loaded or last saved): every save expects it to still be
    current. ``base_end``: where the base's window ends in the agent's token stream (tokens_consolidated + window).
    ``journal``: the tokens taken in since, at stream positions ``base_end ...``: what a merge replays onto another
    writer's consolidation. ``parent``: the first save's explicit parent (after reviving a non-current snapshot).
    ``broken``: the journal lost track (a turn failed half-way, or it grew too long): a conflict cannot be merged.
    ``diverged``: another writer changed the agent in a way that cannot be merged (e.g. a second host took turns):
    the live agent goes on here as if alone, but saves nothing more (it would overwrite the other lineage) until it
    is revived from the store.
    """

    base_id: str | None
    base_end: int
    journal: list[int] = field(default_factory=list)
    parent: str | None = None
    broken: bool = False
    needs_merge: bool = False  # a save conflicted where the turn lock was not ours: merge at the next chance
    diverged: bool = False


@dataclass(frozen=True, slots=True)
class ParkResult:
    """What `AgentHost.park` did: the snapshot the parked agent revives from, whether this call saved it, and the sleep
    job queued for the sleep workers (None: none queued)."""

    agent_id: str
    snapshot_id: str | None
    saved: bool
    slept: bool
    job: SleepJobRecord | None


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
        self._books: dict[str, _Book] = {}  # per live agent with a store: base snapshot and journal (see _Book)
        self._books_lock = threading.Lock()

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
            InvalidInput: the agent already exists here or in the store (revive it instead); of two hosts creating
                one agent at once, exactly one succeeds.
        """
        if self.store is not None:
            try:
                self.store.agent(agent_id)
            except UnknownAgent:
                pass
            else:
                raise InvalidInput(f"agent {agent_id!r} already exists in the snapshot store; revive it instead")
        with self._turn_lock(agent_id):
            self.engine.create_agent(agent_id)
            if self.store is not None:
                with self._books_lock:
                    self._books[agent_id] = _Book(base_id=None, base_end=0)
                try:
                    self._checkpoint(agent_id, "create", swallow=False, locked=True, new_agent=True)
                except BaseException:
                    self._forget(agent_id)
                    self.engine.remove_agent(agent_id)
                    raise
            return self.engine.session(agent_id)

    def revive(self, agent_id: str, snapshot_id: str | None = None) -> AgentSession:
        """Load the agent from the store (latest snapshot, or ``snapshot_id``); it continues exactly from there.

        Reviving an older snapshot (or another agent's) rewinds: the agent's next save branches from it (its parent),
        as a compare-and-set on the agent's current snapshot at the time of this call.
        """
        if self.store is None:
            raise InvalidInput("this host has no snapshot store to revive from")
        with self._turn_lock(agent_id):
            return self._revive_locked(agent_id, snapshot_id)

    def remove(self, agent_id: str, *, save: bool = True) -> None:
        """Take the agent out of the engine. With a store and ``save`` (the default), what it took in since its last
        snapshot is saved first (reason "park"), so nothing is lost; if that save fails the agent stays live and the
        error is raised. ``save=False`` drops the unsaved part on purpose."""
        with self._turn_lock(agent_id):
            self.engine.session(agent_id)  # UnknownAgent before anything else
            if save and self.store is not None and self._dirty(agent_id):
                self._checkpoint(agent_id, "park", swallow=False, locked=True)
            self.engine.remove_agent(agent_id)
            self._forget(agent_id)
        self.scheduler.forget(agent_id)

    def park(self, agent_id: str, *, sleep: bool = True) -> ParkResult:
        """Unload a live agent safely: save what it took in (compare-and-set), remove it from the engine, and with
        ``sleep`` have its window consolidated — by the sleep workers (a Postgres store: a job is queued, see
        `SnapshotStore.enqueue_sleep`) or, with SQLite (no workers), here before it leaves. Revive it anywhere
        afterwards (`revive`, or simply its next `turn`).

        Raises:
            InvalidInput: no store. UnknownAgent: not live here. SnapshotConflict, StoreError: the save failed (the
            agent stays live, nothing lost).
        """
        store = self.store
        if store is None:
            raise InvalidInput("this host has no snapshot store to park agents in")
        slept = False
        queue = store.dialect == "postgresql"
        if sleep and not queue and self.engine.session(agent_id).window_tokens > 0:
            self.sleep_now(agent_id)  # no workers on SQLite: consolidate here, then park
            slept = True
        with self._turn_lock(agent_id):
            saved = False
            if self._dirty(agent_id):
                self._checkpoint(agent_id, "park", swallow=False, locked=True)
                saved = True
            session = self.engine.session(agent_id)
            self.engine.remove_agent(agent_id)
            self._forget(agent_id)
        self.scheduler.forget(agent_id)
        job = None
        if sleep and queue and session.window_tokens > 0:
            job = store.enqueue_sleep(agent_id, passes=self.policy.passes)
        return ParkResult(agent_id, session.snapshot_id, saved, slept, job)

    def session(self, agent_id: str) -> AgentSession:
        return self.engine.session(agent_id)

    def snapshot(self, agent_id: str, reason: str = "manual") -> str:
        """Save the agent's current memory now and return the snapshot id (a compare-and-set; see the module doc).

        Raises `SnapshotConflict` if another writer changed the agent in a way the host cannot merge.
        """
        if self.store is None:
            raise InvalidInput("this host has no snapshot store")
        with self._turn_lock(agent_id):
            sid = self._checkpoint(agent_id, reason, swallow=False, locked=True)
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
            self._merge_pending(agent_id)
            seen = self.engine.session(agent_id).tokens_seen
            t0 = time.perf_counter()
            if self.background:
                self.scheduler.notify_turn(agent_id)
            handle = None
            try:
                gen = None
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
                finally:
                    self._journal_turn(agent_id, seen, ids, gen)
                syncs += gen.sleeps
                if return_logits and gen.prompt_logits is not None:
                    in_logits.append(gen.prompt_logits)
                if not self.background and self.policy.should_sleep_after_turn(gen.window_tokens):
                    syncs += self._sync_sleep(agent_id)
                if self.snapshot_turns and self.store is not None:
                    self._checkpoint(agent_id, "turn", swallow=True, locked=True)
                seconds = time.perf_counter() - t0
            finally:
                if self.background:
                    handle = self.scheduler.turn_finished(agent_id, window_tokens=self._window_tokens(agent_id))
                    if handle is None and self._needs_resync(agent_id):
                        # Below the threshold the job does not sleep; for an unsaved agent it re-saves the memory,
                        # with the scheduler's retries and backoff.
                        handle = self.scheduler.schedule(agent_id, reason="threshold")
                elif self._needs_resync(agent_id):
                    self._checkpoint(agent_id, "resync", swallow=True, locked=True)
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
            self._revive_locked(agent_id, None)
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

    # ------------------------------------------------------------------ saves: compare-and-set, merges

    def _book(self, agent_id: str) -> _Book:
        """The agent's book. An agent made live behind the host's back (``engine.create_agent``, ``import_state``)
        gets one expecting the store's current snapshot, its journal unknown (``broken``). Never asks the engine:
        persist callbacks call this with the agent's engine lock held."""
        with self._books_lock:
            book = self._books.get(agent_id)
        if book is not None:
            return book
        assert self.store is not None
        try:
            current = self.store.current_id(agent_id)
        except UnknownAgent:
            current = None
        with self._books_lock:
            return self._books.setdefault(agent_id, _Book(base_id=current, base_end=0, broken=True))

    def _forget(self, agent_id: str) -> None:
        with self._books_lock:
            self._books.pop(agent_id, None)
        self._unsaved.discard(agent_id)

    def _revive_locked(self, agent_id: str, snapshot_id: str | None) -> AgentSession:
        """`revive` with the turn lock held: load the agent and open its book."""
        assert self.store is not None
        session = revive(self.engine, self.store, agent_id, snapshot_id)
        book = _Book(base_id=session.snapshot_id, base_end=session.tokens_seen)
        if snapshot_id is not None:
            try:
                current = self.store.current_id(agent_id)
            except UnknownAgent:
                current = None
            if current != session.snapshot_id:
                # A rewind (or a fork under a new id): the next save branches from the revived snapshot, expecting
                # the agent's current one to stay put meanwhile. A conflict then cannot be merged.
                book = _Book(base_id=current, base_end=session.tokens_seen, parent=session.snapshot_id, broken=True)
        with self._books_lock:
            self._books[agent_id] = book
        self._unsaved.discard(agent_id)
        return session

    def _dirty(self, agent_id: str) -> bool:
        """Whether the agent holds anything its last snapshot does not (tokens taken in, an unsaved sleep)."""
        if agent_id in self._unsaved:
            return True
        book = self._book(agent_id)
        return book.base_id is None or bool(book.journal) or book.broken or book.needs_merge or book.diverged

    def _needs_resync(self, agent_id: str) -> bool:
        if agent_id in self._unsaved:
            return True
        with self._books_lock:
            book = self._books.get(agent_id)
            return book is not None and book.needs_merge

    def _journal_turn(self, agent_id: str, seen: int, ids: list[int], gen: object) -> None:
        """Journal the tokens a turn took in (the input, then the reply), at their stream positions from ``seen``."""
        if self.store is None:
            return
        try:
            taken = self.engine.session(agent_id).tokens_seen - seen
        except UnknownAgent:
            return
        tokens = ids + list(getattr(gen, "tokens", ()))
        with self._books_lock:
            book = self._books.get(agent_id)
            if book is None or book.broken or taken <= 0:
                return
            if taken > len(tokens):  # generation failed half-way: which tokens went in is unknown
                self._break(book, agent_id, "a turn failed half-way")
                return
            self._took(book, agent_id, seen, tokens[:taken])

    def _took(self, book: _Book, agent_id: str, pos: int, tokens: list[int]) -> None:
        """Append tokens taken in at stream positions ``pos ...`` (books lock held); those a save already holds are
        skipped."""
        if pos + len(tokens) <= book.base_end:
            return
        if pos < book.base_end:
            tokens, pos = tokens[book.base_end - pos :], book.base_end
        if pos != book.base_end + len(book.journal):
            self._break(
                book, agent_id, f"a gap in the token stream (at {pos}, expected {book.base_end + len(book.journal)})"
            )
            return
        book.journal.extend(tokens)
        if len(book.journal) > _JOURNAL_WINDOWS * self.engine.window:
            self._break(book, agent_id, "the store has not caught up for too long")

    @staticmethod
    def _break(book: _Book, agent_id: str, why: str) -> None:
        logger.warning(
            "agent %r: %s; its unsaved tokens cannot be merged with another writer's snapshot", agent_id, why
        )
        book.broken = True
        book.journal = []

    def _saved(self, agent_id: str, record: SnapshotRecord, memory: AgentMemory) -> None:
        """A save of ``memory`` succeeded: it is the new base; the journal keeps only the tokens after it."""
        with self._books_lock:
            book = self._books.get(agent_id)
            if book is None:
                return
            end = memory.tokens_seen
            if book.broken or end < book.base_end:
                book.journal, book.broken = [], False
            else:
                book.journal = book.journal[end - book.base_end :]
            book.base_id, book.base_end, book.parent, book.needs_merge = record.id, end, None, False

    def _save(
        self,
        agent_id: str,
        memory: AgentMemory,
        *,
        reason: str,
        passes: int,
        metadata: dict[str, object] | None = None,
        new_agent: bool = False,
    ) -> SnapshotRecord:
        """Save ``memory`` as a compare-and-set on the agent's base, and make the saved snapshot the new base."""
        assert self.store is not None
        book = self._book(agent_id)
        with self._books_lock:
            expect, parent = book.base_id, book.parent
        record = save_memory(
            self.store,
            agent_id,
            memory,
            reason=reason,
            passes=passes,
            metadata=metadata,
            expect_current=expect,
            new_agent=new_agent or expect is None,
            parent_id=parent,
            max_window=window_limit(self.engine),
        )
        self._saved(agent_id, record, memory)
        return record

    def _persist_sleep(self, commit: SleepCommit) -> str | None:
        if self._book(commit.agent_id).diverged:
            return None  # the sleep stands here; the store holds another writer's lineage, which we never overwrite
        try:
            record = self._save(
                commit.agent_id,
                commit.memory,
                reason="sleep",
                passes=commit.passes,
                metadata={"trigger": commit.trigger, "window_tokens_slept": commit.tokens},
            )
        except SnapshotConflict as e:
            if not self._can_merge(commit.agent_id):
                self._diverge(commit.agent_id, e)
                return None  # as above: the sleep stands here, nothing is saved
            with self._books_lock:
                self._book_or_none(commit.agent_id, needs_merge=True)
            if commit.trigger == "window_full":  # the engine commits this sleep anyway: the store now lags
                self._unsaved.add(commit.agent_id)
            raise  # a requested sleep is dropped; the merge (`_sleep_job`, the next turn) picks the change up
        except Exception:
            if commit.trigger == "window_full":
                self._unsaved.add(commit.agent_id)
            raise
        self._unsaved.discard(commit.agent_id)
        return record.id

    def _can_merge(self, agent_id: str) -> bool:
        """Whether the store's current snapshot is a consolidation of the agent's base (`_merge_locked`)."""
        assert self.store is not None
        book = self._book(agent_id)
        with self._books_lock:
            base_id, base_end, broken = book.base_id, book.base_end, book.broken
        if broken or base_id is None:
            return False
        try:
            current = self.store.current_id(agent_id)
            return current is not None and self._consolidates(self.store.get(current), base_id, base_end)
        except KeyError:  # the agent or its snapshot is gone
            return False

    def _diverge(self, agent_id: str, why: Exception) -> None:
        with self._books_lock:
            book = self._books.get(agent_id)
            if book is None or book.diverged:
                return
            book.diverged, book.needs_merge = True, False
        logger.error(
            "agent %r: another writer changed it in the store in a way this host cannot merge (%s); it goes on "
            "here but saves nothing more for it (revive it to continue from the store)",
            agent_id,
            why,
        )

    def _book_or_none(self, agent_id: str, *, needs_merge: bool) -> None:
        book = self._books.get(agent_id)
        if book is not None:
            book.needs_merge = book.needs_merge or needs_merge

    def _checkpoint(
        self, agent_id: str, reason: str, *, swallow: bool, locked: bool, new_agent: bool = False
    ) -> str | None:
        """Save the agent's memory now (a compare-and-set). On a conflict, merge another writer's consolidation and
        try again (`_merge`); ``locked``: the caller holds the agent's turn lock (a merge needs it)."""
        assert self.store is not None

        def persist(memory: AgentMemory) -> str:
            return self._save(agent_id, memory, reason=reason, passes=self.policy.passes, new_agent=new_agent).id

        if self._book(agent_id).diverged:
            if swallow:
                return None
            raise SnapshotConflict(
                f"agent {agent_id!r} was changed in the store by another writer and its live memory here cannot be "
                "merged; nothing was saved (revive it to continue from the store, or remove(save=False))"
            )
        error: Exception | None = None
        for tries in range(_MERGE_TRIES + 1):
            try:
                sid = self.engine.checkpoint(agent_id, persist)
            except SnapshotConflict as e:
                error = e
                if tries == _MERGE_TRIES or new_agent:
                    break
                try:
                    self._merge(agent_id, locked=locked)
                except Exception as merge_error:
                    error = merge_error
                    break
                continue
            except Exception as e:
                error = e
                break
            self._unsaved.discard(agent_id)
            return sid
        assert error is not None
        self._unsaved.add(agent_id)
        if not swallow:
            raise error
        logger.warning("agent %r: %s snapshot failed (%s); the turn stands", agent_id, reason, error)
        return None

    def _merge_pending(self, agent_id: str) -> None:
        """At a turn's start (turn lock held): merge a conflict a background save met, then save (failures logged)."""
        if self.store is None:
            return
        with self._books_lock:
            book = self._books.get(agent_id)
            pending = book is not None and book.needs_merge
        if pending:
            self._checkpoint(agent_id, "merge", swallow=True, locked=True)

    def _merge(self, agent_id: str, *, locked: bool) -> None:
        """Merge the store's current snapshot of the agent into its live memory (see `_merge_locked`), taking the
        turn lock if the caller does not hold it; if a turn holds it, the merge waits for that turn's end."""
        if locked:
            self._merge_locked(agent_id)
            return
        lock = self._turn_lock(agent_id)
        if not lock.acquire(blocking=False):
            with self._books_lock:
                self._book_or_none(agent_id, needs_merge=True)
            raise SnapshotConflict(f"agent {agent_id!r} moved on in the store; its next turn merges the change")
        try:
            self._merge_locked(agent_id)
        finally:
            lock.release()

    def _merge_locked(self, agent_id: str) -> None:
        """The store's current snapshot C is newer than the agent's base B. If C only consolidates B (sleeps, e.g. by
        a sleep worker: the same token stream), load C and replay the tokens taken in since B on top of it, so
        nothing is lost and C's consolidation is kept; otherwise raise `SnapshotConflict`."""
        assert self.store is not None
        loaded = self.store.latest(agent_id, fingerprint=self.engine.fingerprint)
        rec = loaded.record
        book = self._book(agent_id)
        with self._books_lock:
            base_id, base_end, journal, broken = book.base_id, book.base_end, list(book.journal), book.broken
        if rec.id == base_id:
            with self._books_lock:
                book.needs_merge = False
            return
        if broken or base_id is None or not self._consolidates(rec, base_id, base_end):
            error = SnapshotConflict(
                f"agent {agent_id!r} was changed by another writer (snapshot {rec.id}, seq {rec.seq}, reason "
                f"{rec.reason!r}) in a way this host cannot merge with its live memory; nothing was overwritten. "
                f"Revive it (host.revive) to continue from the store, or remove(save=False) to drop the live copy"
            )
            self._diverge(agent_id, error)
            raise error
        memory = memory_from_snapshot(loaded)
        window = list(memory.window) + journal
        L = self.engine.window
        head, rest = (window, []) if len(window) <= L + 1 else (window[: max(L, len(memory.window))], [])
        if len(head) < len(window):
            rest = window[len(head) :]
        from_journal = len(head) - len(memory.window)
        merged = AgentMemory(
            state=memory.state,
            window=tuple(head),
            tokens_consolidated=memory.tokens_consolidated,
            sleep_count=memory.sleep_count,
            tokens_seen=base_end + from_journal,
        )
        self.engine.import_state(agent_id, merged, snapshot_id=rec.id)
        with self._books_lock:
            book.base_id, book.parent, book.needs_merge = rec.id, None, False
        self._unsaved.add(agent_id)
        logger.info(
            "agent %r: merged snapshot %s written by another process (%s); replayed %d tokens taken in since",
            agent_id,
            rec.id,
            rec.meta.get("worker_id", rec.reason),
            len(journal),
        )
        if rest:  # more than a window: take the rest in as a turn would (sleeping whenever the window is full)
            on_sleep = self._persist_sleep if self._snapshots_on_sleep else None
            self.engine.observe(agent_id, rest, passes=self.policy.passes, on_sleep=on_sleep)

    def _consolidates(self, rec: SnapshotRecord, base_id: str, base_end: int) -> bool:
        """Whether ``rec`` descends from ``base_id`` through sleeps only, over the same token stream (a pure
        consolidation: merging it keeps every token)."""
        assert self.store is not None
        r = rec
        for _ in range(_MERGE_DEPTH):
            if r.id == base_id:
                return True
            seen = r.meta.get("tokens_seen")
            if r.reason != "sleep" or seen != base_end or r.parent_id is None:
                return False
            try:
                r = self.store.get(r.parent_id)
            except KeyError:  # UnknownSnapshot: pruned meanwhile
                return False
        return False

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
            try:
                result = self.engine.sleep(agent_id, request.passes, persist=persist)
            except SnapshotConflict:
                # Another writer saved the agent (e.g. a sleep worker consolidated it): merge that instead of
                # overwriting it. The merged memory is saved; the next threshold decides on the next sleep.
                sid = self._checkpoint(agent_id, "merge", swallow=False, locked=False)
                return SleepOutcome(snapshot_id=sid, tokens=0, detail={"skipped": "merged another writer's snapshot"})
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
        if not self._needs_resync(agent_id) or not request.snapshot or self.store is None:
            return None
        sid = self._checkpoint(agent_id, "resync", swallow=False, locked=False)
        logger.info("agent %r: the store caught up with its memory (snapshot %s)", agent_id, sid)
        return sid


__all__ = ["AgentHost", "Message", "ParkResult", "TurnResult"]
