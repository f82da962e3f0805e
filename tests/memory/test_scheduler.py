"""SleepScheduler: debounce, one sleep per agent, the synchronous path, failures, async API, shutdown.

Time-dependent tests run on a ManualClock, so delays, debounce and backoff are exact and cost no real time; every
blocking wait has a real-time bound so a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter, defaultdict

import pytest

from agentsleep.errors import InvalidInput, SleepFailed, WindowOverflow
from agentsleep.memory import ManualClock, SleepOutcome, SleepPolicy, SleepRequest, SleepScheduler

WAIT = 5.0  # real seconds any single wait may take before the test fails


class FakeJob:
    """A SleepJob that records calls and concurrency, can be held inside the job, and can fail on purpose."""

    def __init__(self, *, fail_first: int = 0, always_fail: bool = False, duration: float = 0.0) -> None:
        self.cond = threading.Condition()
        self.calls: list[SleepRequest] = []
        self.finished: list[SleepRequest] = []
        self.active: Counter[str] = Counter()
        self.max_active: Counter[str] = Counter()
        self.active_total = 0
        self.max_active_total = 0
        self.gates: dict[str, threading.Event] = {}
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.duration = duration

    def hold(self, agent_id: str) -> None:
        self.gates[agent_id] = threading.Event()

    def release(self, agent_id: str) -> None:
        self.gates.pop(agent_id).set()

    def __call__(self, request: SleepRequest) -> SleepOutcome:
        with self.cond:
            self.calls.append(request)
            n = len(self.calls)
            self.active[request.agent_id] += 1
            self.active_total += 1
            self.max_active[request.agent_id] = max(self.max_active[request.agent_id], self.active[request.agent_id])
            self.max_active_total = max(self.max_active_total, self.active_total)
            gate = self.gates.get(request.agent_id)
            self.cond.notify_all()
        try:
            if gate is not None and not gate.wait(WAIT):
                raise AssertionError("test never released the job")
            if self.duration:
                time.sleep(self.duration)
            if self.always_fail or n <= self.fail_first:
                raise RuntimeError(f"boom {n}")
            return SleepOutcome(snapshot_id=f"snap-{n}", passes=request.passes)
        finally:
            with self.cond:
                self.active[request.agent_id] -= 1
                self.active_total -= 1
                self.finished.append(request)
                self.cond.notify_all()

    def n_calls(self, agent_id: str | None = None) -> int:
        with self.cond:
            return sum(1 for r in self.calls if agent_id is None or r.agent_id == agent_id)

    def wait_calls(self, n: int, agent_id: str | None = None) -> None:
        with self.cond:
            ok = self.cond.wait_for(
                lambda: sum(1 for r in self.calls if agent_id is None or r.agent_id == agent_id) >= n, WAIT
            )
        assert ok, f"expected {n} calls for {agent_id}, got {self.n_calls(agent_id)}"

    def wait_finished(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.finished) >= n, WAIT), f"{len(self.finished)} finished"


def quiet() -> None:
    """Give worker threads a moment to do something they should not do (used before negative assertions)."""
    time.sleep(0.05)


def policy(**overrides) -> SleepPolicy:
    base = {
        "window": 100,
        "passes": 2,
        "debounce_seconds": 1.0,
        "retry_backoff_seconds": 1.0,
        "retry_backoff_max_seconds": 8.0,
        "max_retries": 3,
        "sleep_timeout_seconds": WAIT,
    }
    return SleepPolicy(**{**base, **overrides})


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1000.0)


# ---------------------------------------------------------------- debounce


def test_rapid_schedules_make_one_sleep(clock: ManualClock) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(), clock=clock) as sched:
        handles = []
        for _ in range(20):
            handles.append(sched.schedule("a", reason="threshold"))
            clock.advance(0.5)  # under the 1 s debounce: each schedule pushes the start back
        quiet()
        assert job.n_calls() == 0
        assert handles[0].record().status == "pending"
        clock.advance(0.5)
        record = handles[0].result(WAIT)
        assert all(h is handles[0] for h in handles)
        assert job.n_calls() == 1
        assert (record.status, record.reason, record.coalesced, record.attempts) == ("completed", "threshold", 19, 1)
        assert record.outcome is not None and record.outcome.snapshot_id == "snap-1"
        assert record.due_at == pytest.approx(1000.0 + 19 * 0.5 + 1.0)
        request = job.calls[0]
        assert (request.agent_id, request.run_id, request.passes, request.snapshot) == ("a", record.run_id, 2, True)
        assert sched.stats().coalesced == 19


def test_idle_request_never_postpones_a_needed_sleep(clock: ManualClock) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(idle_seconds=60.0), clock=clock) as sched:
        handle = sched.schedule("a", reason="threshold")
        assert sched.schedule("a", reason="idle") is handle
        clock.advance(1.0)
        record = handle.result(WAIT)
        assert (record.reason, record.finished_at) == ("threshold", 1001.0)


def test_threshold_upgrades_a_pending_idle_sleep(clock: ManualClock) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(idle_seconds=60.0), clock=clock) as sched:
        idle = sched.turn_finished("a", window_tokens=10)
        assert idle is not None and idle.record().reason == "idle"
        assert sched.turn_finished("a", window_tokens=80) is idle  # 80 >= 0.75 * 100
        clock.advance(1.0)
        assert idle.result(WAIT).reason == "threshold"


# ---------------------------------------------------------------- one sleep per agent


def test_one_sleep_per_agent_and_agents_in_parallel() -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(debounce_seconds=0.0), max_workers=3) as sched:
        for agent in "abc":
            job.hold(agent)
        first = {agent: sched.schedule(agent) for agent in "abc"}
        job.wait_calls(3)  # three agents inside the job at once
        assert job.max_active_total == 3
        follow_ups = [sched.schedule("a") for _ in range(5)]  # during a's run: exactly one follow-up
        assert all(h is follow_ups[0] for h in follow_ups)
        assert follow_ups[0] is not first["a"]
        assert follow_ups[0].record().status == "created"  # waits on the running sleep
        quiet()
        assert job.n_calls("a") == 1
        for agent in "abc":
            job.release(agent)
        assert sched.flush(WAIT)
        assert job.n_calls("a") == 2 and job.n_calls("b") == 1
        assert max(job.max_active.values()) == 1
        assert [r.status for r in sched.history("a")] == ["completed", "completed"]


def test_global_concurrency_limit() -> None:
    job = FakeJob(duration=0.02)
    with SleepScheduler(job, policy(debounce_seconds=0.0), max_workers=2) as sched:
        for i in range(8):
            sched.schedule(f"agent-{i}")
        assert sched.flush(WAIT)
    assert job.n_calls() == 8
    assert job.max_active_total == 2


def test_many_threads_many_agents_stress() -> None:
    job = FakeJob(duration=0.001)
    errors: list[BaseException] = []
    agents = [f"agent-{i}" for i in range(5)]

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                agent = rng.choice(agents)
                action = rng.random()
                if action < 0.35:
                    sched.schedule(agent, delay=rng.choice([0.0, 0.001, 0.005]))
                elif action < 0.6:
                    sched.notify_turn(agent)
                elif action < 0.85:
                    sched.turn_finished(agent, window_tokens=rng.randint(0, 100))
                else:
                    sched.sleep_now(agent, timeout=WAIT)
        except BaseException as exc:
            errors.append(exc)

    with SleepScheduler(job, policy(debounce_seconds=0.002, idle_seconds=0.003), max_workers=2) as sched:
        threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sched.flush(WAIT)
        stats = sched.stats()
    assert not errors
    assert max(job.max_active.values()) == 1  # never two sleeps of one agent at once
    assert stats.pending == stats.running == 0
    assert stats.completed == job.n_calls()
    assert stats.attempts == job.n_calls()


# ---------------------------------------------------------------- turns: idle sleeps, holds


def test_turn_cancels_pending_idle_sleep(clock: ManualClock) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(idle_seconds=30.0), clock=clock) as sched:
        idle = sched.turn_finished("a", window_tokens=10)
        assert idle is not None and idle.record().status == "pending"
        clock.advance(29.0)
        sched.notify_turn("a")
        record = idle.result(WAIT)
        assert (record.status, record.note) == ("cancelled", "a turn started")
        clock.advance(100.0)
        quiet()
        assert job.n_calls() == 0
        again = sched.turn_finished("a", window_tokens=10)
        assert again is not None and again is not idle
        clock.advance(30.0)
        assert again.result(WAIT).status == "completed"
        assert [r.status for r in sched.history("a")] == ["cancelled", "completed"]


def test_no_idle_sleep_for_an_empty_window_or_without_idle_seconds(clock: ManualClock) -> None:
    with SleepScheduler(FakeJob(), policy(idle_seconds=5.0), clock=clock) as sched:
        assert sched.turn_finished("a", window_tokens=0) is None
    with SleepScheduler(FakeJob(), policy(), clock=clock) as sched:
        assert sched.turn_finished("a", window_tokens=10) is None
        assert sched.turn_finished("a") is None
        with pytest.raises(InvalidInput, match="idle_seconds is None"):
            sched.schedule("a", reason="idle")


def test_turn_holds_a_pending_threshold_sleep(clock: ManualClock) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(), clock=clock) as sched:
        handle = sched.turn_finished("a", window_tokens=90)
        assert handle is not None and handle.record().reason == "threshold"
        sched.notify_turn("a")
        assert handle.record().status == "created"  # held: a sleep never competes with a turn
        clock.advance(10.0)
        quiet()
        assert job.n_calls() == 0
        assert sched.turn_finished("a") is handle  # released, debounced from the turn's end
        assert handle.record().due_at == pytest.approx(1011.0)
        clock.advance(1.0)
        assert handle.result(WAIT).status == "completed"


def test_a_turn_that_never_finishes_releases_the_sleep_after_max_turn_seconds(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(max_turn_seconds=60.0), clock=clock) as sched:
        handle = sched.schedule("a", reason="threshold")
        sched.notify_turn("a")
        clock.advance(59.0)
        quiet()
        assert job.n_calls() == 0
        with caplog.at_level(logging.WARNING, logger="agentsleep.memory.scheduler"):
            clock.advance(1.0)
            assert handle.result(WAIT).status == "completed"
        assert "inside a turn" in caplog.text and "'a'" in caplog.text


def test_turn_never_cancels_a_running_sleep() -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(idle_seconds=0.001)) as sched:
        job.hold("a")
        handle = sched.schedule("a", reason="idle", delay=0.0)
        job.wait_calls(1)
        sched.notify_turn("a")
        assert handle.record().status == "running"
        job.release("a")
        assert handle.result(WAIT).status == "completed"


# ---------------------------------------------------------------- the synchronous path


def test_sleep_now_waits_for_exactly_the_running_sleep(clock: ManualClock) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(), clock=clock) as sched:
        job.hold("a")
        running = sched.schedule("a", delay=0.0)
        job.wait_calls(1)
        follow_up = sched.schedule("a", reason="threshold")  # queued behind the running one
        result: list = []
        waiter = threading.Thread(target=lambda: result.append(sched.sleep_now("a")))
        waiter.start()
        quiet()
        assert waiter.is_alive() and job.n_calls() == 1  # waiting, and no new sleep was started
        job.release("a")
        waiter.join(WAIT)
        assert result[0].run_id == running.run_id and result[0].status == "completed"
        assert follow_up.record().status == "pending"  # still its own, later sleep
        assert job.n_calls() == 1


def test_sleep_now_runs_a_pending_sleep_immediately(clock: ManualClock) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(), clock=clock) as sched:
        pending = sched.schedule("a", delay=3600.0)
        record = sched.sleep_now("a")  # the clock never moves
        assert record.run_id == pending.run_id
        assert (record.status, record.sync, record.reason) == ("completed", True, "manual")
        assert pending.result(WAIT) == record
        assert job.n_calls() == 1


def test_sleep_now_without_anything_pending_runs_one() -> None:
    job = FakeJob()
    with SleepScheduler(job, policy()) as sched:
        record = sched.sleep_now("a")
        assert (record.status, record.reason, record.sync, record.attempts) == ("completed", "sync", True, 1)
        assert sched.stats().sync_sleeps == 1


def test_sleep_now_is_not_limited_by_busy_workers() -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(debounce_seconds=0.0), max_workers=1) as sched:
        job.hold("busy")
        sched.schedule("busy")
        job.wait_calls(1)
        assert sched.sleep_now("urgent").status == "completed"  # the only worker is taken
        job.release("busy")


def test_sleep_now_timeout(clock: ManualClock) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(), clock=clock) as sched:
        job.hold("a")
        with pytest.raises(SleepFailed, match=r"did not finish within 0\.05 s; it keeps running"):
            sched.sleep_now("a", timeout=0.05)
        assert sched.history("a")[-1].status == "running"
        job.release("a")
        assert sched.flush(WAIT)
        assert sched.history("a")[-1].status == "completed"


def test_sleep_now_failure_raises_and_retries_in_background(clock: ManualClock) -> None:
    job = FakeJob(fail_first=1)
    with SleepScheduler(job, policy(), clock=clock) as sched:
        with pytest.raises(SleepFailed, match="failed \\(attempt 1\\): RuntimeError: boom 1; the agent keeps") as err:
            sched.sleep_now("a")
        assert isinstance(err.value.__cause__, RuntimeError)
        (record,) = sched.history("a")
        assert (record.status, record.attempts, record.error) == ("pending", 1, "RuntimeError: boom 1")
        assert record.due_at == pytest.approx(1001.0)  # first backoff: 1 s
        clock.advance(1.0)
        job.wait_finished(2)
        assert sched.flush(WAIT)
        assert sched.history("a")[-1].status == "completed"


def test_ensure_room(clock: ManualClock) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(), clock=clock) as sched:
        assert sched.ensure_room("a", window_tokens=50, incoming_tokens=50) is None
        assert job.n_calls() == 0
        record = sched.ensure_room("a", window_tokens=50, incoming_tokens=51)
        assert record is not None and record.status == "completed"
        with pytest.raises(WindowOverflow, match="split the input"):
            sched.ensure_room("a", window_tokens=0, incoming_tokens=101)


# ---------------------------------------------------------------- failures


def test_failure_then_retry_with_backoff_then_success(clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    job = FakeJob(fail_first=2)
    caplog.set_level(logging.WARNING, logger="agentsleep.memory.scheduler")
    with SleepScheduler(job, policy(), clock=clock) as sched:
        handle = sched.schedule("a", delay=0.0)
        job.wait_finished(1)
        quiet()
        record = handle.record()
        assert (record.status, record.attempts, record.error) == ("pending", 1, "RuntimeError: boom 1")
        assert record.due_at == pytest.approx(1001.0)
        clock.advance(0.99)
        quiet()
        assert job.n_calls() == 1  # still backing off
        clock.advance(0.01)
        job.wait_finished(2)
        quiet()
        assert handle.record().due_at == pytest.approx(1003.0)  # second backoff doubles: 2 s
        clock.advance(2.0)
        record = handle.result(WAIT)
        assert (record.status, record.attempts, record.error) == ("completed", 3, None)
        assert [r.attempt for r in job.calls] == [1, 2, 3]
    assert "sleep of agent 'a' failed" in caplog.text
    assert "attempt 1 of 4" in caplog.text and "attempt 2 of 4" in caplog.text
    assert "retrying in 1 s" in caplog.text and "retrying in 2 s" in caplog.text


def test_permanent_failure_is_recorded_never_raised(clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    job = FakeJob(always_fail=True)
    failures, successes = [], []
    with SleepScheduler(
        job, policy(max_retries=2), clock=clock, on_failure=failures.append, on_success=successes.append
    ) as sched:
        handle = sched.schedule("a", delay=0.0)  # the turn path: none of these calls raises
        job.wait_finished(1)
        sched.notify_turn("b")
        assert sched.turn_finished("b", window_tokens=10) is None
        clock.advance(1.0)
        job.wait_finished(2)
        with caplog.at_level(logging.ERROR, logger="agentsleep.memory.scheduler"):
            clock.advance(2.0)
            record = handle.result(WAIT)
        assert (record.status, record.attempts, record.error) == ("failed", 3, "RuntimeError: boom 3")
        assert failures == [record] and successes == []
        assert "giving up; the agent keeps its last good state" in caplog.text
        stats = sched.stats()
        assert (stats.failed, stats.failed_attempts) == (1, 3)
        # A failing agent is not hammered: the next sleep starts after the (capped) backoff, not at once.
        again = sched.schedule("a", delay=0.0)
        assert again.record().due_at == pytest.approx(clock() + 4.0)
    # Shutdown does not wait out a retry backoff (on this ManualClock it never would end).
    record = again.result(0)
    assert (record.status, record.note) == ("cancelled", "the scheduler shut down during retry backoff")


def test_a_failed_attempt_folds_into_the_queued_follow_up(clock: ManualClock) -> None:
    job = FakeJob(fail_first=1)
    with SleepScheduler(job, policy(), clock=clock) as sched:
        job.hold("a")
        first = sched.schedule("a", delay=0.0)
        job.wait_calls(1)
        follow_up = sched.schedule("a", delay=0.0)
        job.release("a")
        job.wait_finished(1)
        quiet()
        old = first.record()
        assert (old.status, old.superseded_by, old.error) == ("cancelled", follow_up.run_id, "RuntimeError: boom 1")
        assert follow_up.record().due_at == pytest.approx(1001.0)  # the retry keeps its backoff
        clock.advance(1.0)
        final = first.result(WAIT)  # the first handle resolves with the run that did its work
        assert final.run_id == follow_up.run_id and final.status == "completed" and final.attempts == 2
        assert job.n_calls() == 2


def test_hook_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def bad_hook(record) -> None:
        raise ValueError("hook broke")

    with SleepScheduler(FakeJob(), policy(debounce_seconds=0.0), on_success=bad_hook) as sched:
        with caplog.at_level(logging.ERROR, logger="agentsleep.memory.scheduler"):
            assert sched.sleep_now("a").status == "completed"
            assert sched.flush(WAIT)
    assert "sleep hook failed" in caplog.text


# ---------------------------------------------------------------- async API


async def test_async_api_does_not_block_the_event_loop() -> None:
    job = FakeJob(duration=0.2)
    sched = SleepScheduler(job, policy(debounce_seconds=0.0))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        record = await sched.asleep_now("a")
        assert record.status == "completed"
        assert ticks >= 5  # the loop kept running during a 0.2 s sleep
        handle = sched.schedule("b")  # non-blocking calls are fine inside the loop
        assert (await handle).status == "completed"
        assert await sched.aensure_room("c", 10, 10) is None
        assert (await sched.aensure_room("c", 90, 20)).status == "completed"  # type: ignore[union-attr]
        sched.schedule("d", delay=3600.0)
        assert await sched.aflush(WAIT)
        assert await sched.await_idle(WAIT)
    finally:
        task.cancel()
        await sched.ashutdown()
    assert job.n_calls() == 4


async def test_cancelling_an_awaiting_task_does_not_cancel_the_sleep() -> None:
    job = FakeJob()
    async with asyncio.timeout(WAIT):
        with SleepScheduler(job, policy(debounce_seconds=0.0)) as sched:
            job.hold("a")
            handle = sched.schedule("a")
            waiter = asyncio.create_task(handle.wait())
            await asyncio.sleep(0.02)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            job.release("a")
            assert (await handle).status == "completed"


# ---------------------------------------------------------------- flush, shutdown, bookkeeping


def test_flush_runs_delayed_sleeps_now_and_can_time_out() -> None:
    job = FakeJob()
    sched = SleepScheduler(job, policy(idle_seconds=3600.0))
    sched.turn_finished("a", window_tokens=5)
    sched.schedule("b", delay=3600.0)
    sched.notify_turn("b")  # flush also starts sleeps held by a turn
    t0 = time.monotonic()
    assert sched.flush(WAIT)
    assert time.monotonic() - t0 < 1.0
    assert job.n_calls() == 2
    job.hold("c")
    sched.schedule("c", delay=0.0)
    assert sched.flush(timeout=0.05) is False
    assert sched.wait_idle(timeout=0.05) is False
    job.release("c")
    assert sched.wait_idle(WAIT)
    sched.shutdown()


def test_shutdown_cancel_pending_and_later_calls() -> None:
    job = FakeJob()
    sched = SleepScheduler(job, policy())
    pending = sched.schedule("a", delay=3600.0)
    sched.shutdown(cancel_pending=True)
    assert pending.result(WAIT).status == "cancelled"
    assert job.n_calls() == 0
    late = sched.schedule("a")  # never raises into a turn
    assert late.result(WAIT).status == "cancelled"
    sched.notify_turn("a")
    assert sched.turn_finished("a", window_tokens=99) is None
    with pytest.raises(SleepFailed, match="shut down"):
        sched.sleep_now("a")
    assert not any(t.is_alive() for t in sched._workers)


def test_shutdown_drains_by_default_and_without_wait_cancels() -> None:
    job = FakeJob()
    with SleepScheduler(job, policy()) as sched:
        handle = sched.schedule("a", delay=3600.0)
    assert handle.result(0).status == "completed"  # the context manager drained it
    sched = SleepScheduler(job, policy())
    handle = sched.schedule("a", delay=3600.0)
    sched.shutdown(wait=False)
    assert handle.result(WAIT).status == "cancelled"


def test_handle_cancel_history_stats_forget(clock: ManualClock) -> None:
    job = FakeJob()
    with SleepScheduler(job, policy(), clock=clock, history_size=3) as sched:
        handle = sched.schedule("a", delay=10.0)
        assert handle.cancel() is True
        assert handle.cancel() is False
        assert handle.result(0).status == "cancelled"
        for _ in range(3):
            sched.sleep_now("a")
        history = sched.history("a")
        assert len(history) == 3 and all(r.status == "completed" for r in history)  # oldest dropped
        assert sched.history("nobody") == []
        stats = sched.stats()
        assert (stats.agents, stats.completed, stats.cancelled, stats.attempts) == (1, 3, 1, 3)
        assert repr(handle).startswith("SleepHandle(run_id=")
        assert sched.forget("a") is True
        assert sched.history("a") == []


def test_custom_clock_is_polled() -> None:
    offset = [0.0]
    job = FakeJob()
    with SleepScheduler(job, policy(), clock=lambda: 500.0 + offset[0]) as sched:
        handle = sched.schedule("a", delay=1.0)
        quiet()
        assert job.n_calls() == 0
        offset[0] = 1.0
        assert handle.result(WAIT).status == "completed"


def test_invalid_arguments() -> None:
    job = FakeJob()
    with pytest.raises(InvalidInput, match="max_workers"):
        SleepScheduler(job, policy(), max_workers=0)
    with SleepScheduler(job, policy()) as sched:
        with pytest.raises(InvalidInput, match="agent id"):
            sched.schedule("")
        with pytest.raises(InvalidInput, match="delay"):
            sched.schedule("a", delay=-1.0)
        with pytest.raises(InvalidInput, match="reason"):
            sched.schedule("a", reason="sync")  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            ManualClock().advance(-1.0)


def test_each_agent_runs_its_own_sequence_under_concurrent_sync_and_background_calls() -> None:
    """sleep_now from many threads for one agent while background schedules arrive: never two at once."""
    job = FakeJob(duration=0.005)
    results: defaultdict[str, list] = defaultdict(list)
    with SleepScheduler(job, policy(debounce_seconds=0.0), max_workers=2) as sched:

        def caller(i: int) -> None:
            for _ in range(10):
                results[i].append(sched.sleep_now("solo").status)
                sched.schedule("solo")

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sched.flush(WAIT)
    assert job.max_active["solo"] == 1
    assert all(status == "completed" for statuses in results.values() for status in statuses)


def test_a_sleep_scheduled_while_a_hook_runs_is_not_lost() -> None:
    """The agent stays busy until its hook has run; a sleep queued meanwhile starts right after."""
    in_hook, leave_hook = threading.Event(), threading.Event()

    def slow_hook(record) -> None:
        in_hook.set()
        assert leave_hook.wait(WAIT)

    job = FakeJob()
    with SleepScheduler(job, policy(debounce_seconds=0.0), on_success=slow_hook) as sched:
        first = sched.schedule("a")
        assert in_hook.wait(WAIT)
        second = sched.schedule("a")
        assert second is not first and second.record().status == "created"
        leave_hook.set()
        assert first.result(WAIT).status == "completed"
        assert second.result(WAIT).status == "completed"
        assert job.n_calls("a") == 2
        assert job.max_active["a"] == 1


def test_stale_queue_entries_do_not_pile_up(clock: ManualClock) -> None:
    """Every turn re-arms a pending hour-long idle sleep; the internal queue must stay bounded."""
    with SleepScheduler(FakeJob(), policy(idle_seconds=3600.0), clock=clock) as sched:
        for i in range(2000):
            agent = f"agent-{i % 10}"
            sched.notify_turn(agent)
            sched.turn_finished(agent, window_tokens=5)
        assert sched.stats().pending == 10
        assert len(sched._heap) <= 2 * 10 + 65
        sched.shutdown(cancel_pending=True)
