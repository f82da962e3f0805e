"""Running sleeps in the background: per-agent debounce, one sleep per agent at a time, failure-safe.

The scheduler does not know how to sleep. It calls a `SleepJob` (the runtime supplies one: "sleep this agent now,
snapshot the new state, raise on failure") and owns only *when*:

* `notify_turn(agent)` when a turn starts: a pending idle sleep is cancelled, any other pending sleep is held until
  the turn ends (so a background sleep never competes with a turn), a running sleep is left alone.
* `turn_finished(agent, window_tokens=...)` when a turn ends: schedules a threshold sleep (after `debounce_seconds`)
  once the window is `soft_threshold` full, else an idle sleep (after `idle_seconds`) if the policy has one.
* `ensure_room(agent, window_tokens, incoming_tokens)` / `sleep_now(agent)` before a turn that cannot fit: the one
  synchronous path. A pending sleep runs now, a running one is waited for, otherwise one is run; bounded by a timeout.

Failure policy: a job that raises leaves the agent's last good state in place (the job's contract), is logged with
the agent id and attempt, and is retried with capped exponential backoff up to `max_retries`; then the run is recorded
as failed and `on_failure` is called. Nothing raised by a background sleep ever reaches `schedule`, `notify_turn` or
`turn_finished`. Only `sleep_now` / `ensure_room` raise (`SleepFailed`), because their caller must decide what to do
with a turn that still does not fit.

Design anchors: LangMem's `ReflectionExecutor` (per-thread debounce, one worker; langchain spec §12.1) and Letta's
sleep-time run records (§12.2). Unlike LangMem, a new schedule for an agent *coalesces* into its pending run instead of
cancelling it: a sleep has no payload (it always consolidates the agent's current window), so the pending run already
is the requested work, and its waiters keep a valid handle.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from agentsleep.errors import InvalidInput, SleepFailed, WindowOverflow
from agentsleep.ids import check_agent_id
from agentsleep.memory.policy import SleepPolicy
from agentsleep.model.adaptive import Passes

logger = logging.getLogger(__name__)

SleepReason = Literal["threshold", "idle", "manual", "sync"]
"""Why a sleep was scheduled: window past the soft threshold, agent idle, an explicit request, or a turn that could
not fit (the synchronous path)."""

SleepStatus = Literal["created", "pending", "running", "completed", "failed", "cancelled"]
"""`created`: waiting on its agent (a sleep of the same agent is running, or the agent is inside a turn).
`pending`: waiting for its time (debounce, idle delay, retry backoff) or a free worker. `running`: the job is
executing. `completed` / `failed` (retries exhausted) / `cancelled` are final."""

_FINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
DEFAULT_HISTORY_SIZE = 100  # run records kept per agent; older ones are dropped first


@dataclass(frozen=True, slots=True)
class SleepRequest:
    """What the job is asked to do: one attempt at sleeping one agent."""

    agent_id: str
    run_id: str
    reason: SleepReason
    attempt: int  # 1-based, counting earlier failed attempts of this run
    passes: Passes  # N or AutoPasses, from the policy (capped by max_sleep_seconds)
    snapshot: bool  # persist the new state to the store (policy.snapshot_after_sleep)
    timeout_seconds: float  # advisory: a job that can stop early should stop past this; none is killed


@dataclass(frozen=True, slots=True)
class SleepOutcome:
    """What a successful job reports back; every field is optional."""

    snapshot_id: str | None = None  # the snapshot written after the sleep, if any
    passes: int | None = None  # passes actually run
    tokens: int | None = None  # window tokens consolidated
    detail: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping in the run record


SleepJob = Callable[[SleepRequest], SleepOutcome | None]
"""Sleep `request.agent_id` now: run `request.passes` passes over its window into S, clear the window, and if
`request.snapshot`, save the new state to the snapshot store. Return a `SleepOutcome` (or None).

Contract: on any exception the agent's live state must be unchanged (compute and persist the new state first, then
swap it in), so the scheduler can retry safely. Called from a worker thread (or a dedicated thread for `sleep_now`),
never twice at once for one agent. Must not call `sleep_now` / `ensure_room` for its own agent (it would wait for
itself)."""

RecordHook = Callable[["SleepRecord"], None]


@dataclass(frozen=True, slots=True)
class SleepRecord:
    """A run record: one scheduled sleep, however many attempts it took. Times are in the scheduler's clock."""

    run_id: str
    agent_id: str
    reason: SleepReason
    status: SleepStatus
    sync: bool  # some attempt ran on the synchronous path (a turn waited for it)
    attempts: int
    passes: int
    coalesced: int  # further schedules merged into this run (debounce at work)
    created_at: float
    due_at: float  # earliest start requested (delay, retry backoff)
    started_at: float | None
    finished_at: float | None
    run_seconds: float  # time spent inside the job, summed over attempts
    error: str | None  # the last attempt's error, "Type: message"
    note: str | None  # why it was cancelled or superseded
    superseded_by: str | None  # the run that took over this run's work
    outcome: SleepOutcome | None

    @property
    def done(self) -> bool:
        return self.status in _FINAL


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """Counters since the scheduler started."""

    agents: int
    pending: int  # open runs not yet started (created or pending)
    running: int
    completed: int
    failed: int
    cancelled: int
    attempts: int
    failed_attempts: int
    coalesced: int
    sync_sleeps: int  # attempts run on the synchronous path
    run_seconds_total: float
    run_seconds_max: float


@dataclass(slots=True)
class _Attempt:
    number: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass(slots=True, eq=False)
class _Run:
    run_id: str
    agent_id: str
    reason: SleepReason
    created_at: float
    due: float
    not_before: float = 0.0  # retry backoff floor; the synchronous path ignores it
    status: SleepStatus = "created"
    sync: bool = False
    ignore_hold: bool = False  # flush/shutdown start it even while its agent is inside a turn
    attempts: int = 0
    coalesced: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    run_seconds: float = 0.0
    error: str | None = None
    note: str | None = None
    superseded_by: str | None = None
    outcome: SleepOutcome | None = None
    version: int = 0  # bumped on every re-arm; older heap entries are stale
    attempt: _Attempt | None = None
    future: concurrent.futures.Future[SleepRecord] = field(default_factory=concurrent.futures.Future)
    # Futures to resolve with this run's final record: its own, plus those of runs merged into it.
    waiters: list[concurrent.futures.Future[SleepRecord]] = field(default_factory=list)
    handle: SleepHandle | None = None

    def __post_init__(self) -> None:
        self.waiters.append(self.future)

    def record(self, passes: int) -> SleepRecord:
        """The run record; ``passes`` is the policy's N (at most), replaced by the passes the job reports it ran."""
        if self.outcome is not None and self.outcome.passes is not None:
            passes = self.outcome.passes
        return SleepRecord(
            run_id=self.run_id,
            agent_id=self.agent_id,
            reason=self.reason,
            status=self.status,
            sync=self.sync,
            attempts=self.attempts,
            passes=passes,
            coalesced=self.coalesced,
            created_at=self.created_at,
            due_at=max(self.due, self.not_before),
            started_at=self.started_at,
            finished_at=self.finished_at,
            run_seconds=self.run_seconds,
            error=self.error,
            note=self.note,
            superseded_by=self.superseded_by,
            outcome=self.outcome,
        )


@dataclass(slots=True)
class _Agent:
    history: deque[_Run]
    pending: _Run | None = None
    running: _Run | None = None
    in_turn_since: float | None = None
    failure_streak: int = 0  # consecutive failed attempts, any run; drives the backoff
    retry_not_before: float = 0.0


class SleepHandle:
    """A scheduled sleep. `result()` / `await handle` give its final `SleepRecord` (never raise for a failed sleep:
    read `record.status`). If the run was merged into another one, the final record is that run's."""

    __slots__ = ("_future", "_run", "_scheduler")

    def __init__(self, scheduler: SleepScheduler, run: _Run, future: concurrent.futures.Future[SleepRecord]) -> None:
        self._scheduler = scheduler
        self._run = run
        self._future = future

    @property
    def run_id(self) -> str:
        return self._run.run_id

    @property
    def agent_id(self) -> str:
        return self._run.agent_id

    def record(self) -> SleepRecord:
        """The run's record now (possibly still pending or running)."""
        return self._scheduler._record_of(self._run)

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> SleepRecord:
        """Block until the sleep is final; raises `TimeoutError` after `timeout` real seconds."""
        return self._future.result(timeout)

    def cancel(self) -> bool:
        """Cancel the sleep if it has not started; True if it was cancelled."""
        return self._scheduler._cancel_run(self._run, "cancelled by its handle")

    async def wait(self) -> SleepRecord:
        """Async twin of `result()`. Cancelling the awaiting task does not cancel the sleep."""
        # shield: otherwise cancelling the awaiting task would cancel the shared concurrent future for every waiter.
        return await asyncio.shield(asyncio.wrap_future(self._future))

    def __await__(self) -> Any:
        return self.wait().__await__()

    def __repr__(self) -> str:
        return f"SleepHandle(run_id={self.run_id!r}, agent_id={self.agent_id!r}, status={self._run.status!r})"


class ManualClock:
    """A clock that moves only when told to, for deterministic tests: `SleepScheduler(..., clock=ManualClock())`.

    Delays, debounce, backoff and turn leases follow this clock; blocking timeouts (`result`, `flush`, `sleep_now`)
    stay in real seconds.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._listeners: list[weakref.WeakMethod[Callable[[], None]]] = []

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise InvalidInput(f"a clock cannot go back; got {seconds}")
        with self._lock:
            self._now += seconds
            listeners = [ref() for ref in self._listeners]
        for wake in listeners:
            if wake is not None:
                wake()

    def subscribe(self, wake: Callable[[], None]) -> None:
        """Call bound method `wake` after every `advance` (held weakly)."""
        with self._lock:
            self._listeners.append(weakref.WeakMethod(wake))  # type: ignore[arg-type]


# How often a worker re-reads a custom clock that cannot wake it (real seconds).
_CUSTOM_CLOCK_POLL_SECONDS = 0.005


class SleepScheduler:
    """Runs sleeps in the background for many agents, at most one per agent at a time.

    Args:
        job: the `SleepJob` that sleeps one agent (see its contract).
        policy: the `SleepPolicy` (delays, thresholds, retries, timeouts).
        max_workers: background sleeps that may run at once, across all agents (sleep is CPU/GPU heavy; on the
            2-core reference machine one was the stable choice). Synchronous sleeps (`sleep_now`) run outside this
            limit on their own thread, because a turn is waiting for them.
        clock: monotonic seconds; pass a `ManualClock` in tests.
        on_success: called with the final record after a sleep completes (in the sleeping thread; errors logged).
        on_failure: called with the final record after a sleep has failed for good.
        history_size: run records kept per agent.

    All methods are thread-safe. `schedule`, `notify_turn`, `turn_finished` only take a lock for microseconds and
    never wait on a sleep, so they are safe to call from an event loop; the blocking calls have `a`-prefixed twins.
    """

    def __init__(
        self,
        job: SleepJob,
        policy: SleepPolicy,
        *,
        max_workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_success: RecordHook | None = None,
        on_failure: RecordHook | None = None,
        history_size: int = DEFAULT_HISTORY_SIZE,
    ) -> None:
        if max_workers < 1:
            raise InvalidInput(f"max_workers must be >= 1, got {max_workers}")
        if history_size < 2:
            raise InvalidInput(f"history_size must be >= 2 (a running and a pending run), got {history_size}")
        self.job = job
        self.policy = policy
        self.max_workers = max_workers
        self._clock = clock
        self._on_success = on_success
        self._on_failure = on_failure
        self._history_size = history_size

        self._cond = threading.Condition(threading.Lock())
        self._agents: dict[str, _Agent] = {}
        self._open: dict[str, _Run] = {}  # runs not yet final, by id
        self._heap: list[tuple[float, int, int, _Run]] = []  # (start time, tiebreak, run version, run)
        self._seq = itertools.count()
        self._closed = False  # no new sleeps, no more retries
        self._settling = 0  # finished attempts whose hooks and waiters are still being served
        self._stopping = False  # workers exit
        self._counts: dict[str, int] = dict.fromkeys(
            ("completed", "failed", "cancelled", "attempts", "failed_attempts", "coalesced", "sync_sleeps"), 0
        )
        self._run_seconds_max = 0.0
        self._run_seconds_total = 0.0
        self._seconds_per_pass: float | None = None  # measured, for policy.max_sleep_seconds

        # Workers wait in real seconds. A ManualClock wakes them when advanced; any other custom clock is polled.
        self._manual = isinstance(clock, ManualClock)
        if isinstance(clock, ManualClock):
            clock.subscribe(self._wake)
        self._poll = None if self._manual or clock is time.monotonic else _CUSTOM_CLOCK_POLL_SECONDS
        self._workers = [
            threading.Thread(target=self._worker_loop, name=f"agentsleep-sleep-{i}", daemon=True)
            for i in range(max_workers)
        ]
        for worker in self._workers:
            worker.start()

    # ------------------------------------------------------------------ turn path (non-blocking)

    def notify_turn(self, agent_id: str) -> None:
        """A turn of `agent_id` starts: cancel its pending idle sleep; hold any other pending sleep until
        `turn_finished` (or `max_turn_seconds`). A running sleep is never cancelled."""
        check_agent_id(agent_id)
        resolve: list[tuple[_Run, SleepRecord]] = []
        with self._cond:
            if self._closed:
                return
            now = self._clock()
            slot = self._slot(agent_id)
            slot.in_turn_since = now
            run = slot.pending
            if run is not None:
                if run.reason == "idle":
                    resolve.append(self._finish(slot, run, "cancelled", now, note="a turn started"))
                else:
                    self._arm(slot, run, now)  # re-armed as held: it starts after the turn
        self._resolve(resolve)

    def turn_finished(self, agent_id: str, *, window_tokens: int | None = None) -> SleepHandle | None:
        """A turn of `agent_id` ended; schedule what the policy asks for and return its handle (or None).

        With `window_tokens` at or past the soft threshold: a threshold sleep after `debounce_seconds`. Otherwise, if
        `idle_seconds` is set (and the window is not known to be empty): an idle sleep after `idle_seconds`; a later
        turn cancels it. A sleep held by this turn is released, no earlier than `debounce_seconds` from now.
        """
        check_agent_id(agent_id)
        policy = self.policy
        with self._cond:
            if self._closed:
                return None
            now = self._clock()
            slot = self._slot(agent_id)
            slot.in_turn_since = None
            run = slot.pending
            if run is not None:  # released by this turn's end, but debounced like a fresh request
                run.due = max(run.due, now + policy.debounce_seconds)
            if window_tokens is not None and policy.should_sleep_after_turn(window_tokens):
                return self._schedule_locked(slot, agent_id, "threshold", policy.debounce_seconds, now)
            if policy.idle_seconds is not None and (window_tokens is None or window_tokens > 0):
                return self._schedule_locked(slot, agent_id, "idle", policy.idle_seconds, now)
            if run is None:
                return None
            self._arm(slot, run, now)
            return self._handle(run)

    def schedule(
        self, agent_id: str, *, delay: float | None = None, reason: Literal["threshold", "idle", "manual"] = "manual"
    ) -> SleepHandle:
        """Ask for a background sleep of `agent_id` after `delay` seconds and return its handle.

        Debounced per agent: if a sleep is already pending, this call merges into it and moves its start to
        `now + delay` (an idle request never postpones a pending non-idle sleep). If a sleep is running, exactly one
        follow-up is queued. Default delay: `debounce_seconds` for threshold, `idle_seconds` for idle, 0 for manual.
        Never raises for a sleep's failure; after `shutdown` it returns an already-cancelled handle.
        """
        check_agent_id(agent_id)
        if reason not in ("threshold", "idle", "manual"):
            raise InvalidInput(f"reason must be 'threshold', 'idle' or 'manual', got {reason!r}")
        if delay is None:
            delay = {"threshold": self.policy.debounce_seconds, "idle": self.policy.idle_seconds, "manual": 0.0}[reason]
            if delay is None:
                raise InvalidInput("reason='idle' needs a delay when the policy's idle_seconds is None")
        if delay < 0:
            raise InvalidInput(f"delay must be >= 0 seconds, got {delay}")
        resolve: list[tuple[_Run, SleepRecord]] = []
        with self._cond:
            now = self._clock()
            if self._closed:
                logger.warning("schedule(%r) after shutdown: the sleep is cancelled", agent_id)
                run = self._new_run(agent_id, reason, now, now + delay)
                self._slot(agent_id).history.append(run)
                resolve.append(self._finish(None, run, "cancelled", now, note="the scheduler is shut down"))
                handle = self._handle(run)
            else:
                handle = self._schedule_locked(self._slot(agent_id), agent_id, reason, delay, now)
        self._resolve(resolve)
        return handle

    # ------------------------------------------------------------------ synchronous path

    def ensure_room(
        self, agent_id: str, window_tokens: int, incoming_tokens: int, *, timeout: float | None = None
    ) -> SleepRecord | None:
        """Make room for a turn of `incoming_tokens` beside `window_tokens`: return None if it already fits, else
        sleep now (see `sleep_now`) and return the record.

        Raises:
            WindowOverflow: `incoming_tokens` alone exceed the window L; no sleep helps, split the input.
            SleepFailed: the sleep failed or timed out; the agent keeps its last good state.
        """
        if not self.policy.fits_empty_window(incoming_tokens):
            raise WindowOverflow(
                f"{incoming_tokens} incoming tokens exceed the window of {self.policy.window} tokens even after a "
                "sleep; split the input into window-sized parts"
            )
        if not self.policy.must_sleep_before(window_tokens, incoming_tokens):
            return None
        return self.sleep_now(agent_id, timeout=timeout)

    def sleep_now(self, agent_id: str, *, timeout: float | None = None) -> SleepRecord:
        """Sleep `agent_id` before continuing, for a turn that cannot fit its window.

        If a sleep of this agent is running, wait for exactly that one; if one is pending, start it now (ignoring
        its delay and any retry backoff); otherwise start a new one. The sleep runs on its own thread, outside the
        `max_workers` limit. Waits at most `timeout` real seconds (default `policy.sleep_timeout_seconds`).

        Returns the run's record after a successful attempt.

        Raises:
            SleepFailed: the attempt failed (it is retried in the background per the policy) or did not finish in
                time (it keeps running). Either way the agent keeps its last good state.
        """
        check_agent_id(agent_id)
        timeout = self.policy.sleep_timeout_seconds if timeout is None else timeout
        with self._cond:
            if self._closed:
                raise SleepFailed(f"cannot sleep agent {agent_id!r}: the scheduler is shut down")
            now = self._clock()
            slot = self._slot(agent_id)
            if slot.running is not None:
                run = slot.running
                attempt = run.attempt
                start = False
            else:
                run = slot.pending
                if run is None:
                    run = self._new_run(agent_id, "sync", now, now)
                    self._open[run.run_id] = run
                    slot.history.append(run)
                run.sync = True
                attempt = self._start(slot, run, now)
                self._counts["sync_sleeps"] += 1
                start = True
        assert attempt is not None  # a running run always has an attempt
        if start:
            threading.Thread(
                target=self._execute, args=(run, attempt), name=f"agentsleep-sync-{agent_id}", daemon=True
            ).start()
        if not attempt.done.wait(timeout):
            raise SleepFailed(
                f"sleep {run.run_id} of agent {agent_id!r} did not finish within {timeout:g} s; it keeps running in "
                "the background and the agent keeps its last good state until it completes"
            )
        if attempt.error is not None:
            raise SleepFailed(
                f"sleep {run.run_id} of agent {agent_id!r} failed (attempt {attempt.number}): "
                f"{_describe(attempt.error)}; the agent keeps its last good state"
            ) from attempt.error
        return self._record_of(run)

    # ------------------------------------------------------------------ inspection

    def history(self, agent_id: str) -> list[SleepRecord]:
        """Run records of `agent_id`, oldest first (open runs included); empty for an unknown agent."""
        with self._cond:
            slot = self._agents.get(agent_id)
            return [] if slot is None else [run.record(self.policy.nominal_passes) for run in slot.history]

    def stats(self) -> SchedulerStats:
        with self._cond:
            running = sum(1 for run in self._open.values() if run.status == "running")
            c = self._counts
            return SchedulerStats(
                agents=len(self._agents),
                pending=len(self._open) - running,
                running=running,
                completed=c["completed"],
                failed=c["failed"],
                cancelled=c["cancelled"],
                attempts=c["attempts"],
                failed_attempts=c["failed_attempts"],
                coalesced=c["coalesced"],
                sync_sleeps=c["sync_sleeps"],
                run_seconds_total=self._run_seconds_total,
                run_seconds_max=self._run_seconds_max,
            )

    def forget(self, agent_id: str) -> bool:
        """Drop the records of an agent with no open sleep (e.g. after it is deleted); True if dropped."""
        with self._cond:
            slot = self._agents.get(agent_id)
            if slot is None or slot.pending is not None or slot.running is not None:
                return False
            del self._agents[agent_id]
            return True

    # ------------------------------------------------------------------ draining and shutdown

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait (real seconds) until no sleep is pending or running, without hurrying any; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._open or self._settling:
                remaining = _remaining(deadline)
                if remaining == 0.0:
                    return False
                self._cond.wait(remaining)
            return True

    def flush(self, timeout: float | None = None) -> bool:
        """Start every pending sleep now (their delays and turn holds are skipped; retry backoff is kept) and wait
        until none is pending or running. False if `timeout` real seconds passed first.

        After `shutdown` began, a sleep still waiting out its retry backoff is cancelled instead of waited for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            resolve: list[tuple[_Run, SleepRecord]] = []
            with self._cond:
                if not self._open and not self._settling:
                    return True
                now = self._clock()
                for run in list(self._open.values()):
                    if run.status == "running":
                        continue
                    slot = self._agents[run.agent_id]
                    if self._closed and run.not_before > now:
                        note = "the scheduler shut down during retry backoff"
                        resolve.append(self._finish(slot, run, "cancelled", now, note=note))
                    elif run.due > now or not run.ignore_hold:
                        run.due = min(run.due, now)
                        run.ignore_hold = True
                        self._arm(slot, run, now)
                if not resolve:  # else resolve first (outside the lock), then look again
                    remaining = _remaining(deadline)
                    if remaining == 0.0:
                        return False
                    self._cond.wait(remaining)
            self._resolve(resolve)

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting sleeps. With `wait`, run what is pending now (unless `cancel_pending`) and wait for running
        sleeps; without it, cancel what is pending and return at once (running sleeps finish on daemon threads).
        Failed attempts are not retried after shutdown, and a sleep waiting out its retry backoff is cancelled."""
        resolve: list[tuple[_Run, SleepRecord]] = []
        with self._cond:
            self._closed = True
            if cancel_pending or not wait:
                now = self._clock()
                for run in list(self._open.values()):
                    if run.status != "running":
                        slot = self._agents[run.agent_id]
                        resolve.append(self._finish(slot, run, "cancelled", now, note="the scheduler shut down"))
        self._resolve(resolve)
        if wait and not self.flush(timeout):
            logger.warning("shutdown: sleeps still open after %s s; leaving them to daemon threads", timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if wait:
            for worker in self._workers:
                worker.join(timeout)

    def __enter__(self) -> SleepScheduler:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown(wait=True)

    # ------------------------------------------------------------------ async twins of the blocking calls

    async def asleep_now(self, agent_id: str, *, timeout: float | None = None) -> SleepRecord:
        """`sleep_now` without blocking the event loop."""
        return await asyncio.to_thread(self.sleep_now, agent_id, timeout=timeout)

    async def aensure_room(
        self, agent_id: str, window_tokens: int, incoming_tokens: int, *, timeout: float | None = None
    ) -> SleepRecord | None:
        """`ensure_room` without blocking the event loop (returns at once when no sleep is needed)."""
        if not self.policy.must_sleep_before(window_tokens, incoming_tokens) and self.policy.fits_empty_window(
            incoming_tokens
        ):
            return None
        return await asyncio.to_thread(self.ensure_room, agent_id, window_tokens, incoming_tokens, timeout=timeout)

    async def aflush(self, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.flush, timeout)

    async def await_idle(self, timeout: float | None = None) -> bool:
        """Async twin of `wait_idle`."""
        return await asyncio.to_thread(self.wait_idle, timeout)

    async def ashutdown(self, wait: bool = True, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        await asyncio.to_thread(self.shutdown, wait, cancel_pending=cancel_pending, timeout=timeout)

    # ------------------------------------------------------------------ internals (call with self._cond held)

    def _slot(self, agent_id: str) -> _Agent:
        slot = self._agents.get(agent_id)
        if slot is None:
            slot = self._agents[agent_id] = _Agent(history=deque(maxlen=self._history_size))
        return slot

    def _new_run(self, agent_id: str, reason: SleepReason, now: float, due: float) -> _Run:
        return _Run(run_id=uuid.uuid4().hex, agent_id=agent_id, reason=reason, created_at=now, due=due)

    def _handle(self, run: _Run) -> SleepHandle:
        if run.handle is None:
            run.handle = SleepHandle(self, run, run.future)
        return run.handle

    def _schedule_locked(
        self, slot: _Agent, agent_id: str, reason: SleepReason, delay: float, now: float
    ) -> SleepHandle:
        run = slot.pending
        if run is not None:
            run.coalesced += 1
            self._counts["coalesced"] += 1
            if not (reason == "idle" and run.reason != "idle"):  # idle never postpones a needed sleep
                run.reason = reason
                run.due = now + delay
        else:
            run = self._new_run(agent_id, reason, now, now + delay)
            run.not_before = slot.retry_not_before  # a failing agent is not hammered by fresh runs either
            slot.pending = run
            self._open[run.run_id] = run
            slot.history.append(run)
        self._arm(slot, run, now)
        return self._handle(run)

    def _arm(self, slot: _Agent, run: _Run, now: float) -> None:
        """(Re)queue `run` at its start time; a run behind a running sleep waits for it to end instead."""
        run.version += 1  # every older heap entry of this run is now stale
        if slot.running is not None:
            run.status = "created"
            return
        start = max(run.due, run.not_before)
        held = slot.in_turn_since is not None and not run.ignore_hold
        if held:
            start = max(start, slot.in_turn_since + self.policy.max_turn_seconds)
        run.status = "created" if held else "pending"
        entry = (start, next(self._seq), run.version, run)
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._open) + 64:
            # Re-arming leaves the old entry behind until its time comes; with hour-long idle delays and busy agents
            # that would pile up, so drop stale entries once they outnumber live ones (amortised O(1) per push).
            self._heap = [e for e in self._heap if e[2] == e[3].version and e[3].status in ("pending", "created")]
            heapq.heapify(self._heap)
        if self._heap[0] is entry:  # only an earlier start changes what a worker waits for
            self._cond.notify_all()

    def _pop_ready(self, now: float) -> tuple[_Run | None, float | None]:
        """The next run that may start now, or (None, seconds until the earliest entry)."""
        heap = self._heap
        while heap:
            start, _, version, run = heap[0]
            if version != run.version or run.status not in ("pending", "created"):
                heapq.heappop(heap)
                continue
            if start > now:
                return None, start - now
            heapq.heappop(heap)
            slot = self._agents[run.agent_id]
            if slot.running is not None:  # not expected (runs behind a running sleep are not queued); re-armed later
                run.status = "created"
                continue
            if slot.in_turn_since is not None and not run.ignore_hold:
                # Reached only at the turn lease's end: the turn never reported back, so stop waiting for it.
                logger.warning(
                    "agent %r has been inside a turn for %.0f s without turn_finished; starting sleep %s anyway",
                    run.agent_id,
                    now - slot.in_turn_since,
                    run.run_id,
                )
                slot.in_turn_since = None
            return run, None
        return None, None

    def _start(self, slot: _Agent, run: _Run, now: float) -> _Attempt:
        if slot.pending is run:
            slot.pending = None
        slot.running = run
        run.status = "running"
        run.version += 1
        run.attempts += 1
        if run.started_at is None:
            run.started_at = now
        run.attempt = _Attempt(run.attempts)
        self._counts["attempts"] += 1
        return run.attempt

    def _finish(
        self, slot: _Agent | None, run: _Run, status: SleepStatus, now: float, *, note: str | None = None
    ) -> tuple[_Run, SleepRecord]:
        """Make `run` final; returns what `_resolve` must deliver once the lock is released."""
        run.status = status
        run.finished_at = now
        run.version += 1
        if note is not None:
            run.note = note
        if slot is not None and slot.pending is run:
            slot.pending = None
        self._open.pop(run.run_id, None)
        self._counts[status] += 1
        self._cond.notify_all()
        return run, run.record(self.policy.nominal_passes)

    def _resolve(self, finished: list[tuple[_Run, SleepRecord]]) -> None:
        for run, record in finished:
            waiters, run.waiters = run.waiters, []
            for future in waiters:
                if not future.done():
                    future.set_result(record)

    def _record_of(self, run: _Run) -> SleepRecord:
        with self._cond:
            return run.record(self.policy.nominal_passes)

    def _cancel_run(self, run: _Run, note: str) -> bool:
        with self._cond:
            if run.status not in ("pending", "created"):
                return False
            finished = self._finish(self._agents[run.agent_id], run, "cancelled", self._clock(), note=note)
        self._resolve([finished])
        return True

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ workers

    def _worker_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = self._clock()
                    run, wait = self._pop_ready(now)
                    if run is not None:
                        attempt = self._start(self._agents[run.agent_id], run, now)
                        break
                    if self._manual:
                        wait = None  # advance() wakes us
                    elif self._poll is not None:
                        wait = self._poll if wait is None else min(wait, self._poll)
                    self._cond.wait(wait)
            self._execute(run, attempt)

    def _execute(self, run: _Run, attempt: _Attempt) -> None:
        """Run one attempt of `run` (outside the lock) and record its result."""
        policy = self.policy
        request = SleepRequest(
            agent_id=run.agent_id,
            run_id=run.run_id,
            reason=run.reason,
            attempt=attempt.number,
            passes=policy.passes_within(policy.max_sleep_seconds, self._seconds_per_pass),
            snapshot=policy.snapshot_after_sleep,
            timeout_seconds=policy.sleep_timeout_seconds,
        )
        t0 = time.perf_counter()
        outcome: SleepOutcome | None = None
        try:
            outcome = self.job(request) or SleepOutcome()
        except BaseException as exc:  # a worker must never die holding the agent's slot
            attempt.error = exc
        elapsed = time.perf_counter() - t0
        if elapsed > policy.sleep_timeout_seconds:
            logger.warning(
                "sleep %s of agent %r took %.1f s, past sleep_timeout_seconds=%g",
                run.run_id,
                run.agent_id,
                elapsed,
                policy.sleep_timeout_seconds,
            )
        hook, finished = self._after_attempt(run, attempt, outcome, elapsed)
        # Hook first, then waiters, then the agent's next sleep: whoever sees this sleep finished (sleep_now, a
        # handle, flush, the follow-up) also sees its hook's effects, e.g. the adopted snapshot id.
        if hook is not None and finished:
            try:
                hook(finished[0][1])
            except Exception:
                logger.exception("sleep hook failed for agent %r (run %s); ignored", run.agent_id, run.run_id)
        self._resolve(finished)
        attempt.done.set()
        with self._cond:
            slot = self._agents[run.agent_id]
            slot.running = None
            follow_up = slot.pending  # the retry, or a sleep queued during this one (even during the hook)
            if follow_up is not None:
                self._arm(slot, follow_up, self._clock())
            self._settling -= 1
            self._cond.notify_all()

    @property
    def seconds_per_pass(self) -> float | None:
        """Seconds one sleep pass took on this scheduler's jobs (a running mean of the latest sleeps; None before
        the first one that reported its passes). `SleepPolicy.max_sleep_seconds` caps passes with it."""
        return self._seconds_per_pass

    def _measure_pass(self, outcome: SleepOutcome | None, elapsed: float) -> None:
        """Update `seconds_per_pass` from a sleep that reports the passes it ran (locked)."""
        if outcome is None or not outcome.passes or outcome.passes < 1 or outcome.tokens == 0:
            return  # nothing ran (an empty window) or the job did not say
        spp = elapsed / outcome.passes
        old = self._seconds_per_pass
        self._seconds_per_pass = spp if old is None else 0.5 * old + 0.5 * spp

    def _after_attempt(
        self, run: _Run, attempt: _Attempt, outcome: SleepOutcome | None, elapsed: float
    ) -> tuple[RecordHook | None, list[tuple[_Run, SleepRecord]]]:
        """Record the attempt's result and decide what comes next; the agent stays busy until `_execute` settles."""
        policy = self.policy
        with self._cond:
            self._settling += 1  # until hooks ran and waiters were released; flush and wait_idle wait for it
            now = self._clock()
            slot = self._agents[run.agent_id]
            run.run_seconds += elapsed
            self._run_seconds_total += elapsed
            self._run_seconds_max = max(self._run_seconds_max, elapsed)
            follow_up = slot.pending
            finished: list[tuple[_Run, SleepRecord]] = []
            hook: RecordHook | None = None
            if attempt.error is None:
                slot.failure_streak = 0
                slot.retry_not_before = 0.0
                if follow_up is not None:
                    follow_up.not_before = 0.0
                run.outcome = outcome
                run.error = None
                self._measure_pass(outcome, elapsed)
                finished.append(self._finish(slot, run, "completed", now))
                hook = self._on_success
                logger.info(
                    "agent %r slept (run %s, %s, attempt %d) in %.3f s",
                    run.agent_id,
                    run.run_id,
                    run.reason,
                    attempt.number,
                    elapsed,
                )
            else:
                self._counts["failed_attempts"] += 1
                slot.failure_streak += 1
                delay = policy.retry_delay(slot.failure_streak)
                slot.retry_not_before = now + delay
                run.error = _describe(attempt.error)
                can_retry = run.attempts <= policy.max_retries and not self._closed
                if can_retry and follow_up is not None:
                    # A follow-up sleep is queued anyway and covers the same window: it carries the retry.
                    follow_up.attempts += run.attempts
                    follow_up.not_before = slot.retry_not_before
                    follow_up.waiters.extend(run.waiters)
                    run.waiters = []
                    run.superseded_by = follow_up.run_id
                    finished.append(
                        self._finish(slot, run, "cancelled", now, note="attempt failed; the follow-up sleep retries")
                    )
                elif can_retry:
                    run.not_before = slot.retry_not_before
                    run.status = "created"  # armed by _execute once settled
                    slot.pending = run
                else:
                    finished.append(self._finish(slot, run, "failed", now))
                    hook = self._on_failure
                log = logger.warning if can_retry else logger.error
                log(
                    "sleep of agent %r failed (run %s, attempt %d of %d): %s; %s",
                    run.agent_id,
                    run.run_id,
                    attempt.number,
                    policy.max_retries + 1,
                    run.error,
                    f"retrying in {delay:g} s" if can_retry else "giving up; the agent keeps its last good state",
                    exc_info=attempt.error,
                )
            self._cond.notify_all()
            return hook, finished


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


__all__ = [
    "DEFAULT_HISTORY_SIZE",
    "ManualClock",
    "SchedulerStats",
    "SleepHandle",
    "SleepJob",
    "SleepOutcome",
    "SleepReason",
    "SleepRecord",
    "SleepRequest",
    "SleepScheduler",
    "SleepStatus",
]
