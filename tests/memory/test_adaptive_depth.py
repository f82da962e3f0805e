"""Adaptive sleep depth (``SleepPolicy(passes="auto", max_passes, tol)``) the same everywhere a sleep runs: the
policy, `TorchEngine` (requested and window-full sleeps), `AgentHost`, the scheduler's cap by idle time, and the sleep
workers (direct `consolidate` on SQLite and Postgres, queued jobs on Postgres). Every adaptive sleep must equal the
fixed-N sleep at the N it stopped at, and report that N."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from agentsleep.errors import InvalidInput
from agentsleep.memory import SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.memory.scheduler import SleepOutcome, SleepRequest, SleepScheduler
from agentsleep.memory.worker import SleepWorker, consolidate
from agentsleep.model.adaptive import AutoPasses, cap_passes, check_passes, passes_to_json, sleep_adaptive
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.runtime import SleepCommit, TorchEngine, save_memory
from agentsleep.store import SnapshotStore
from tests.runtime.helpers import make_model, turn_tokens

L, NMAX = 16, 6
FAST = {"heartbeat_s": 0.3, "stalled_after_s": 2.0, "retry_backoff_s": 0.05, "poll_s": 0.1}


@pytest.fixture(scope="module")
def model() -> SleepHybrid:
    return make_model(window=L, passes=3)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SnapshotStore]:
    url = (
        f"sqlite:///{tmp_path / 's.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_schema_url")
    )
    with SnapshotStore(url) as s:
        yield s


def stop_between(model: SleepHybrid, tokens: list[int]) -> tuple[AutoPasses, int]:
    """A tolerance at which the adaptive sleep of ``tokens`` (from zero state) stops strictly between 2 and NMAX
    passes, and that N: the midpoint between two measured changes, so rounding cannot move the stop."""
    x = torch.tensor([tokens])
    deltas = [float(d) for d in sleep_adaptive(model, x, model.init_state(1), max_passes=NMAX, tol=0.0).deltas]
    for tol in sorted((a + b) / 2 for a, b in itertools.pairwise(sorted(deltas)) if b - a > 1e-4 * b):
        used = next((j for j, d in enumerate(deltas, start=2) if d < tol), NMAX)
        if 2 < used < NMAX:
            return AutoPasses(NMAX, tol), used
    pytest.fail(f"no tolerance stops between 2 and {NMAX} passes (changes {deltas})")


def assert_state(got, model: SleepHybrid, tokens: list[int], passes: int) -> None:
    want = model.sleep(torch.tensor([tokens]), model.init_state(1), passes)
    for a, b in zip(got.ssm, want.ssm, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- policy


def test_policy_auto_and_its_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    p = SleepPolicy(window=L, passes="auto", max_passes=5, tol=0.1, criterion="kl")
    assert p.sleep_passes == AutoPasses(5, 0.1, "kl") and p.nominal_passes == 5
    assert SleepPolicy(window=L, passes=3).sleep_passes == 3 == SleepPolicy(window=L, passes=3).nominal_passes
    assert SleepPolicy.with_depth(L, AutoPasses(7, 0.2)).sleep_passes == AutoPasses(7, 0.2)
    assert SleepPolicy.with_depth(L, 2, soft_threshold=0.5).sleep_passes == 2
    monkeypatch.setenv("AGENTSLEEP_SLEEP_PASSES", "auto")
    monkeypatch.setenv("AGENTSLEEP_SLEEP_MAX_PASSES", "4")
    assert SleepPolicy.from_env(window=L).sleep_passes == AutoPasses(4, 0.05, "state")
    monkeypatch.setenv("AGENTSLEEP_SLEEP_PASSES", "2")
    assert SleepPolicy.from_env(window=L).sleep_passes == 2
    for bad in ({"passes": 0}, {"passes": "often"}, {"max_passes": 0}, {"tol": -0.1}, {"criterion": "loss"}):
        with pytest.raises(ValueError):
            SleepPolicy(window=L, **bad)


def test_passes_within_caps_by_the_time_available() -> None:
    auto = SleepPolicy(window=L, passes="auto", max_passes=8, tol=0.05)
    assert auto.passes_within(None, 0.1) == auto.passes_within(1.0, None) == AutoPasses(8, 0.05)
    assert auto.passes_within(0.35, 0.1) == AutoPasses(3, 0.05)  # 3.5 passes fit: 3
    assert auto.passes_within(0.01, 0.1) == AutoPasses(1, 0.05)  # at least one pass always runs
    assert auto.passes_within(100.0, 0.1) == AutoPasses(8, 0.05)  # never above max_passes
    fixed = SleepPolicy(window=L, passes=4)
    assert fixed.passes_within(0.25, 0.1) == 2 and fixed.passes_within(10.0, 0.1) == 4
    assert cap_passes(5, None) == 5 and cap_passes(AutoPasses(8, 0.1), 0) == AutoPasses(1, 0.1)


def test_the_json_form_of_a_depth() -> None:
    a = AutoPasses(6, 0.02, "kl")
    assert check_passes(passes_to_json(a)) == a and passes_to_json(3) == 3 == check_passes(3)
    for bad in (0, True, 2.0, "auto", {"auto": False}, {"auto": True, "passes": 3}, {"auto": True, "tol": -1}):
        with pytest.raises(InvalidInput):
            check_passes(bad)


# ---------------------------------------------------------------------------------------------------- engine


def test_engine_sleep_auto_equals_the_fixed_sleep_at_the_n_it_used(model: SleepHybrid) -> None:
    tokens = turn_tokens(1, 12)
    auto, used = stop_between(model, tokens)
    commits: list[SleepCommit] = []
    engine = TorchEngine(model)
    engine.create_agent("a")
    engine.observe("a", tokens)
    res = engine.sleep("a", auto, persist=lambda c: commits.append(c) or "sid")
    assert (res.passes, res.tokens, res.snapshot_id) == (used, 12, "sid") and commits[0].passes == used
    assert_state(engine.export_state("a").state, model, tokens, used)
    assert engine.sleep("a", auto).skipped == "empty"
    with pytest.raises(InvalidInput):
        engine.sleep("a", {"auto": True, "max_passes": 0})


def test_an_auto_engine_sleeps_adaptively_when_the_window_fills(model: SleepHybrid) -> None:
    tokens = turn_tokens(2, L)
    auto, used = stop_between(model, tokens)
    engine = TorchEngine(model, passes=auto)
    assert engine.passes == auto
    engine.create_agent("w")
    commits: list[SleepCommit] = []
    out = engine.observe("w", [*tokens, 5, 6], on_sleep=lambda c: commits.append(c) or None)
    assert out.sleeps == 1 and [(c.passes, c.trigger) for c in commits] == [(used, "window_full")]
    ref = TorchEngine(model)
    ref.create_agent("w")
    ref.observe("w", tokens)
    ref.sleep("w", used)
    ref.observe("w", [5, 6])
    for a, b in zip(engine.export_state("w").state.ssm, ref.export_state("w").state.ssm, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- host


def test_host_with_an_auto_policy(store: SnapshotStore, model: SleepHybrid) -> None:
    tokens = turn_tokens(3, 10)
    auto, used = stop_between(model, tokens)
    policy = SleepPolicy(window=L, passes="auto", max_passes=auto.max_passes, tol=auto.tol, soft_threshold=1.0,
                         debounce_seconds=0.0)  # fmt: skip
    with AgentHost(TorchEngine(model), store, policy, background=False) as host:
        host.create("h")
        host.observe("h", tokens)
        record = host.sleep_now("h")
        assert record.passes == used and record.outcome is not None and record.outcome.passes == used
        assert_state(host.engine.export_state("h").state, model, tokens, used)
    latest = store.latest("h")
    assert latest.record.reason == "sleep" and latest.record.passes == used
    assert_state(latest.state, model, tokens, used)


def test_the_scheduler_caps_passes_by_idle_time() -> None:
    seen: list[object] = []

    def job(request: SleepRequest) -> SleepOutcome:
        seen.append(request.passes)
        time.sleep(0.06)  # six passes of at least 10 ms each
        return SleepOutcome(passes=6, tokens=4)

    policy = SleepPolicy(window=L, passes="auto", max_passes=6, tol=0.05, max_sleep_seconds=0.03)
    with SleepScheduler(job, policy) as sched:
        assert sched.seconds_per_pass is None
        sched.sleep_now("x")  # nothing measured yet: uncapped
        assert sched.seconds_per_pass is not None and sched.seconds_per_pass >= 0.01
        sched.sleep_now("x")
    assert seen[0] == AutoPasses(6, 0.05)
    assert isinstance(seen[1], AutoPasses) and 1 <= seen[1].max_passes <= 3 and seen[1].tol == 0.05


# ---------------------------------------------------------------------------------------------------- workers


def _seed(store: SnapshotStore, model: SleepHybrid, agent_id: str, tokens: list[int]) -> None:
    engine = TorchEngine(model)
    engine.create_agent(agent_id)
    engine.observe(agent_id, tokens)
    save_memory(store, agent_id, engine.export_state(agent_id), reason="turn", passes=3)


def test_consolidate_with_auto_passes(store: SnapshotStore, model: SleepHybrid) -> None:
    tokens = turn_tokens(4, 9)
    auto, used = stop_between(model, tokens)
    _seed(store, model, "c", tokens)
    done = consolidate(TorchEngine(model), store, "c", passes=passes_to_json(auto))  # the form a job carries
    assert done.passes == used and store.get(done.snapshot_id).passes == used
    assert_state(store.latest("c").state, model, tokens, used)
    with pytest.raises(InvalidInput):
        consolidate(TorchEngine(model), store, "c", passes={"auto": True, "criterion": "vibes"})


@pytest.mark.postgres
def test_queued_auto_sleeps_run_adaptively(postgres_schema_url: str, model: SleepHybrid) -> None:
    tokens = turn_tokens(5, 11)
    auto, used = stop_between(model, tokens)
    with SnapshotStore(postgres_schema_url) as pg:
        _seed(pg, model, "q", tokens)
        job = pg.enqueue_sleep("q", passes=auto)
        assert job.passes == passes_to_json(auto)
        with pytest.raises(InvalidInput):
            pg.enqueue_sleep("q", passes={"auto": "yes"})
        worker = SleepWorker(TorchEngine(model, passes=2), pg, worker_id="w", **FAST)
        assert worker.run(wait=False) == 1
        slept = pg.latest("q")
        assert slept.record.reason == "sleep" and slept.record.passes == used
        assert_state(slept.state, model, tokens, used)

        # a host whose policy is adaptive queues adaptive jobs when it parks an agent
        policy = SleepPolicy(window=L, passes="auto", max_passes=auto.max_passes, tol=auto.tol, soft_threshold=1.0)
        with AgentHost(TorchEngine(model), pg, policy, background=False) as host:
            host.create("p")
            host.observe("p", tokens)
            parked = host.park("p")
        assert parked.job is not None and parked.job.passes == passes_to_json(auto)
        assert worker.run(wait=False) == 1 and pg.latest("p").record.passes == used
