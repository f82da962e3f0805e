"""Claim: the sleep scheduler costs a turn only microseconds; sleeping itself never happens on the turn path.

Times the calls a turn makes (`notify_turn` at its start, `turn_finished` at its end, or an explicit `schedule`) one
by one with `perf_counter_ns`, and compares them with a no-op Python call of the same shape (which also measures the
timer's own cost). Sleeps are scheduled an hour ahead, so no job runs while timing: this is pure turn-path overhead.
Cases:

* `schedule (coalesce)`: a burst of turns of one agent; every call merges into the pending sleep (the debounce path).
* `schedule (new agent)`: every call creates a run for a fresh agent (uuid, future, heap push).
* `notify_turn + turn_finished`: one whole turn's bookkeeping, window past the soft threshold.
* `turn, many agents`: the same, round-robin over `--agents` agents, with that many sleeps pending.
* `ensure_room (fits)`: the pre-turn check when no sleep is needed.

Tests: tests/memory/test_scheduler.py. Run: `.venv/bin/python benchmarks/bench_scheduler.py`.
"""

from __future__ import annotations

import argparse
import gc
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

from agentsleep.memory import SleepOutcome, SleepPolicy, SleepRequest, SleepScheduler


def _job(request: SleepRequest) -> SleepOutcome:
    return SleepOutcome()


def _noop(agent_id: str, *, delay: float | None = None, reason: str = "manual") -> None:
    return None


def _time_calls(call: Callable[[int], object], n: int) -> list[float]:
    """Per-call wall time in µs for call(0..n-1), after a short warm-up."""
    for i in range(min(1000, n)):
        call(i)
    out = []
    clock = time.perf_counter_ns
    gc.disable()  # a collection inside one timed call would be charged to whichever call it hit
    try:
        for i in range(n):
            t0 = clock()
            call(i)
            out.append((clock() - t0) / 1000.0)
    finally:
        gc.enable()
    return out


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="timed calls per case")
    parser.add_argument("--agents", type=int, default=1000, help="agents in the many-agents case")
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"python {platform.python_version()} on {platform.machine()}, calls per case: {args.calls}")

    # Debounce and idle an hour ahead: nothing starts while we time.
    policy = SleepPolicy(window=4096, debounce_seconds=3600.0, idle_seconds=3600.0)
    n = args.calls
    results: dict[str, list[float]] = {}
    results["no-op call (baseline)"] = _time_calls(lambda i: _noop("agent", reason="threshold"), n)

    with SleepScheduler(_job, policy) as sched:
        results["schedule (coalesce)"] = _time_calls(lambda i: sched.schedule("a", reason="threshold"), n)
        sched.shutdown(cancel_pending=True)
    with SleepScheduler(_job, policy) as sched:
        results["schedule (new agent)"] = _time_calls(lambda i: sched.schedule(f"agent-{i}", reason="threshold"), n)
        sched.shutdown(cancel_pending=True)
    with SleepScheduler(_job, policy) as sched:

        def turn(i: int) -> None:
            sched.notify_turn("a")
            sched.turn_finished("a", window_tokens=4000)

        results["notify_turn + turn_finished"] = _time_calls(turn, n)
        sched.shutdown(cancel_pending=True)
    with SleepScheduler(_job, policy) as sched:
        agents = [f"agent-{i}" for i in range(args.agents)]

        def turn_many(i: int) -> None:
            agent = agents[i % len(agents)]
            sched.notify_turn(agent)
            sched.turn_finished(agent, window_tokens=4000)

        results[f"turn, {args.agents} agents"] = _time_calls(turn_many, n)
        sched.shutdown(cancel_pending=True)
    with SleepScheduler(_job, policy) as sched:
        results["ensure_room (fits)"] = _time_calls(lambda i: sched.ensure_room("a", 100, 100), n)

    base = results["no-op call (baseline)"]
    base50, base95 = statistics.median(base), _pct(base, 95)
    print(f"{'case':<30} {'p50 µs':>8} {'p95 µs':>8} {'p50 ratio':>10} {'p95 ratio':>10}")
    for name, xs in results.items():
        p50, p95 = statistics.median(xs), _pct(xs, 95)
        print(f"{name:<30} {p50:8.2f} {p95:8.2f} {p50 / base50:9.1f}x {p95 / base95:9.1f}x")


if __name__ == "__main__":
    main()
