"""SleepWorker: sleep jobs from a shared store are consolidated exactly like the engine's own sleep, saved as a
compare-and-set (a newer snapshot is never clobbered), done once each by any number of workers, and a bad job never
stops a worker. Every store-backed test runs on SQLite and Postgres (fixtures as in tests/store/conftest.py)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select, update

from agentsleep.cli import main
from agentsleep.errors import InvalidInput
from agentsleep.memory import SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.memory.worker import SleepWorker
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.runtime import SamplingParams, TorchEngine, memory_from_snapshot, save_memory
from agentsleep.store import Snapshot, SnapshotRecord, SnapshotStore
from tests.runtime.helpers import make_model, turn_tokens
from tests.store.conftest import postgres_db, postgres_schema_url, postgres_server_url  # noqa: F401  (fixtures)

L, N = 16, 3


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_schema_url")


@pytest.fixture
def store(store_url: str) -> Iterator[SnapshotStore]:
    with SnapshotStore(store_url) as s:
        yield s


@pytest.fixture(scope="module")
def model() -> SleepHybrid:
    return make_model(window=L, passes=N)


def seed_agent(store: SnapshotStore, model: SleepHybrid, agent_id: str, tokens: list[int]) -> SnapshotRecord:
    """An agent whose current snapshot holds ``tokens`` in its window (as a host's turn snapshot would)."""
    engine = TorchEngine(model)
    engine.create_agent(agent_id)
    if tokens:
        engine.observe(agent_id, tokens)
    return save_memory(store, agent_id, engine.export_state(agent_id), reason="turn", passes=N)


def sleeps(store: SnapshotStore, agent_id: str) -> list[SnapshotRecord]:
    return [r for r in store.history(agent_id) if r.reason == "sleep"]


# ---------------------------------------------------------------------------------------------- equivalence, revival


def test_a_workers_sleep_is_the_engines_sleep_and_a_revived_agent_continues_from_it(
    store: SnapshotStore, model: SleepHybrid
) -> None:
    policy = SleepPolicy(window=L, passes=N, soft_threshold=1.0, debounce_seconds=0.0)
    with AgentHost(TorchEngine(model), store, policy, background=False, snapshot_turns=True) as host:
        host.create("a")
        host.observe("a", turn_tokens(1, 10))
        host.sleep_now("a")  # a sleep by the host itself: the conventions the worker must follow
        host.turn("a", turn_tokens(2, 5), max_new_tokens=3)  # then a turn, snapshotted with its window
    host_sleep = sleeps(store, "a")[-1]
    turn = store.latest("a")
    assert turn.record.reason == "turn" and len(turn.window) == 8 and turn.record.tokens_consolidated == 10

    # the reference: the same memory imported into an engine and slept there
    ref = TorchEngine(model)
    ref.import_state("ref", memory_from_snapshot(store.load(turn.record.id)))
    expected = ref.sleep("ref", 2)
    assert expected.tokens == 8

    store.enqueue_sleep("a", params={"passes": 2})
    engine = TorchEngine(model)
    job = SleepWorker(engine, store, worker_id="w-1").run_once()
    assert job is not None and job.status == "done" and job.claimed_by == "w-1" and job.error is None
    assert engine.agent_ids() == []  # the private agent is gone again

    new = store.latest("a", fingerprint=model.fingerprint)
    rec = new.record
    assert rec.id == job.result_snapshot_id == store.agent("a").current_snapshot_id
    ref_state = ref.export_state("ref").state
    assert all(torch.equal(x, y) for x, y in zip(new.state.ssm, ref_state.ssm, strict=True))
    assert new.state.digest() == ref_state.digest()
    assert new.window == []
    assert (rec.reason, rec.parent_id, rec.passes) == ("sleep", turn.record.id, 2)
    assert rec.tokens_consolidated == 10 + 8
    assert rec.meta["sleep_count"] == host_sleep.meta["sleep_count"] + 1 == 2
    assert rec.meta["tokens_seen"] == turn.record.meta["tokens_seen"] == 18
    assert (rec.meta["trigger"], rec.meta["window_tokens_slept"]) == ("sleep", 8)
    assert (rec.meta["worker_id"], rec.meta["job_id"]) == ("w-1", job.id)
    assert set(host_sleep.meta) <= set(rec.meta)  # everything a host records about a sleep, and more

    # a host on a fresh engine revives the agent from the worker's snapshot and continues exactly like the reference
    with AgentHost(TorchEngine(model), store, policy, background=False) as host2:
        s = host2.revive("a")
        assert (s.snapshot_id, s.tokens_consolidated, s.sleep_count, s.window) == (rec.id, 18, 2, ())
        prompt = turn_tokens(3, 6)
        got = host2.turn("a", prompt, max_new_tokens=4, return_logits=True)
        want = ref.generate("ref", prompt, SamplingParams(max_new_tokens=4), return_logits=True, passes=N)
        assert got.tokens == want.tokens
        assert torch.equal(got.input_logits, want.prompt_logits) and torch.equal(got.logits, want.logits)
        host2.sleep_now("a")
        assert store.latest("a").record.parent_id == rec.id  # the host's next sleep continues the lineage


def test_an_empty_window_is_done_without_a_snapshot(store: SnapshotStore, model: SleepHybrid) -> None:
    first = seed_agent(store, model, "a", [])
    store.enqueue_sleep("a")
    job = SleepWorker(TorchEngine(model), store).run_once()
    assert job is not None and (job.status, job.result_snapshot_id, job.error) == ("done", None, None)
    assert [r.id for r in store.history("a")] == [first.id]


def test_passes_come_from_the_job_then_the_worker_then_the_engine(store: SnapshotStore, model: SleepHybrid) -> None:
    for i, params in enumerate([{"passes": 1}, {}]):
        seed_agent(store, model, f"a{i}", turn_tokens(i, 6))
        store.enqueue_sleep(f"a{i}", params=params)
    worker = SleepWorker(TorchEngine(model, passes=4), store, passes=2)
    assert worker.run(poll_s=0, max_jobs=2) == 2
    assert [sleeps(store, f"a{i}")[0].passes for i in range(2)] == [1, 2]
    seed_agent(store, model, "a2", turn_tokens(2, 6))
    store.enqueue_sleep("a2")
    SleepWorker(TorchEngine(model, passes=4), store).run_once()
    assert sleeps(store, "a2")[0].passes == 4


# ---------------------------------------------------------------------------------------------- compare-and-set


def test_a_turn_saved_while_the_worker_sleeps_supersedes_its_job(
    store: SnapshotStore, model: SleepHybrid, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_agent(store, model, "a", turn_tokens(1, 6))
    user = TorchEngine(model)
    user.import_state("a", memory_from_snapshot(store.latest("a")))
    newer: list[SnapshotRecord] = []
    engine = TorchEngine(make_model(window=L, passes=N))  # its own copy of the model, patched below
    real = engine.model.sleep_window

    def sleep_while_a_turn_lands(cache, passes=None):  # between the worker's load and its save
        if not newer:
            user.observe("a", turn_tokens(2, 3))
            newer.append(save_memory(store, "a", user.export_state("a"), reason="turn", passes=N))
        return real(cache, passes)

    monkeypatch.setattr(engine.model, "sleep_window", sleep_while_a_turn_lands)
    worker = SleepWorker(engine, store, worker_id="w")
    store.enqueue_sleep("a")
    job = worker.run_once()
    assert job is not None and job.status == "failed" and job.error.startswith("superseded: ")
    assert job.result_snapshot_id is None and engine.agent_ids() == []
    assert store.agent("a").current_snapshot_id == newer[0].id  # the newer turn stays current
    assert sleeps(store, "a") == []
    # a later job consolidates the newer snapshot, window and all
    store.enqueue_sleep("a")
    again = worker.run_once()
    assert again is not None and again.status == "done"
    rec = store.get(again.result_snapshot_id)
    assert rec.parent_id == newer[0].id and rec.tokens_consolidated == 9


# ---------------------------------------------------------------------------------------------- failures


def _flip_payload(store: SnapshotStore, snapshot_id: str) -> None:
    with store.engine.begin() as c:
        data = bytearray(c.execute(select(Snapshot.payload).where(Snapshot.id == snapshot_id)).scalar_one())
        data[len(data) // 2] ^= 0x01
        c.execute(update(Snapshot).where(Snapshot.id == snapshot_id).values(payload=bytes(data)))


def test_bad_jobs_fail_with_a_clear_message_and_the_worker_goes_on(store: SnapshotStore, model: SleepHybrid) -> None:
    corrupt = seed_agent(store, model, "corrupt", turn_tokens(1, 5))
    _flip_payload(store, corrupt.id)
    other = make_model(window=L, passes=N, seed=1)
    assert other.fingerprint != model.fingerprint
    seed_agent(store, other, "other-model", turn_tokens(2, 5))
    seed_agent(store, model, "bad-passes", turn_tokens(3, 5))
    good = seed_agent(store, model, "good", turn_tokens(4, 5))
    for agent, params in [("corrupt", {}), ("other-model", {}), ("bad-passes", {"passes": "four"}), ("good", {})]:
        store.enqueue_sleep(agent, params=params)

    engine = TorchEngine(model)
    finished = []
    n = SleepWorker(engine, store, worker_id="w").run(poll_s=0, max_jobs=3, on_job=finished.append)
    assert n == 3 and [j.agent_id for j in finished] == ["corrupt", "bad-passes", "good"]
    by_agent = {j.agent_id: j for j in store.jobs()}
    assert by_agent["corrupt"].status == "failed" and by_agent["corrupt"].error.startswith("SnapshotCorrupt: ")
    assert by_agent["bad-passes"].status == "failed" and "passes' must be an int >= 1" in by_agent["bad-passes"].error
    assert by_agent["good"].status == "done" and store.get(by_agent["good"].result_snapshot_id).parent_id == good.id
    assert store.agent("corrupt").current_snapshot_id == corrupt.id  # failures write nothing
    assert engine.agent_ids() == []
    # Another model's agent is left to a worker of that model: never claimed, never failed by this one.
    assert by_agent["other-model"].status == "pending" and SleepWorker(engine, store).run_once() is None
    assert [r.reason for r in store.history("other-model")] == ["turn"]
    theirs = SleepWorker(TorchEngine(other), store, worker_id="w2").run_once()
    assert theirs is not None and (theirs.agent_id, theirs.status) == ("other-model", "done")


def test_a_model_that_raises_fails_the_job_and_leaves_the_agent(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(window=L, passes=N)
    snap = seed_agent(store, model, "a", turn_tokens(1, 5))
    engine = TorchEngine(model)

    def boom(cache, passes=None):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(engine.model, "sleep_window", boom)
    store.enqueue_sleep("a")
    job = SleepWorker(engine, store).run_once()
    assert job is not None and (job.status, job.error) == ("failed", "RuntimeError: out of memory (injected)")
    assert store.agent("a").current_snapshot_id == snap.id and engine.agent_ids() == []


def test_a_job_of_a_dead_worker_is_taken_over_once_stale(store: SnapshotStore, model: SleepHybrid) -> None:
    seed_agent(store, model, "a", turn_tokens(1, 5))
    store.enqueue_sleep("a")
    assert store.claim_job("dead-worker") is not None
    assert SleepWorker(TorchEngine(model), store, stale_after_s=60).run_once() is None
    time.sleep(0.05)
    job = SleepWorker(TorchEngine(model), store, worker_id="heir", stale_after_s=0.01).run_once()
    assert job is not None and (job.status, job.claimed_by, job.attempts) == ("done", "heir", 2)


def test_bad_arguments(store: SnapshotStore, model: SleepHybrid) -> None:
    engine = TorchEngine(model)
    for kw in [{"passes": 0}, {"worker_id": ""}, {"worker_id": "x" * 129}, {"stale_after_s": 0}]:
        with pytest.raises(InvalidInput):
            SleepWorker(engine, store, **kw)
    with pytest.raises(InvalidInput):
        SleepWorker(engine, store).run(max_jobs=0)


# ---------------------------------------------------------------------------------------------- scale-out


def test_two_workers_drain_the_queue_each_job_done_once(store_url: str, model: SleepHybrid) -> None:
    n = 8
    with SnapshotStore(store_url) as s:
        seeded = {f"agent-{i}": seed_agent(s, model, f"agent-{i}", turn_tokens(i, 4 + i % 5)).id for i in range(n)}
        for agent in seeded:
            s.enqueue_sleep(agent)
    engine = TorchEngine(model)  # shared: each job's agent lives under its own private id
    done: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def work(name: str) -> None:
        try:
            with SnapshotStore(store_url) as s:
                mine: list[int] = []
                SleepWorker(engine, s, worker_id=name).run(poll_s=0.02, stop=stop, on_job=lambda j: mine.append(j.id))
                done[name] = mine
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    with SnapshotStore(store_url) as s:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(j.status in ("pending", "running") for j in s.jobs()):
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads)
        jobs = s.jobs()
        counts = Counter(jid for mine in done.values() for jid in mine)
        assert len(jobs) == n and set(counts) == {j.id for j in jobs} and set(counts.values()) == {1}
        assert {j.status for j in jobs} == {"done"} and all(j.attempts == 1 for j in jobs)
        assert {j.claimed_by for j in jobs} <= {"w0", "w1"}
        for j in jobs:
            (slept,) = sleeps(s, j.agent_id)
            assert slept.id == j.result_snapshot_id == s.agent(j.agent_id).current_snapshot_id
            assert slept.parent_id == seeded[j.agent_id] and slept.meta["job_id"] == j.id
    assert engine.agent_ids() == []


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, model: SleepHybrid) -> Path:
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "toy")


def test_cli_once_processes_one_job(store_url: str, checkpoint: Path, model: SleepHybrid) -> None:
    engine = TorchEngine.from_pretrained(checkpoint)
    assert engine.fingerprint == model.fingerprint
    with SnapshotStore(store_url) as s:
        seed = seed_agent(s, model, "a", turn_tokens(1, 7))
        s.enqueue_sleep("a", params={"passes": 2})
    args = ["sleep-worker", "--checkpoint", str(checkpoint), "--url", store_url, "--once", "--worker-id", "cli-1"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    with SnapshotStore(store_url) as s:
        (job,) = s.jobs("a")
        assert (job.status, job.claimed_by) == ("done", "cli-1")
        rec = s.get(job.result_snapshot_id)
        assert (rec.parent_id, rec.passes, rec.meta["worker_id"]) == (seed.id, 2, "cli-1")
    assert f"job {job.id} agent a: done -> snapshot {rec.id}" in res.stdout
    assert "sleep-worker cli-1: model " in res.stderr
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0 and "no pending sleep job" in again.stdout


def test_cli_loop_stops_after_max_jobs_and_reports_failures(store_url: str, checkpoint: Path) -> None:
    other = make_model(window=L, passes=N, seed=1)
    with SnapshotStore(store_url) as s:
        seed_agent(s, other, "stranger", turn_tokens(1, 5))  # another model's agent: left to that model's workers
        seed_agent(s, make_model(window=L, passes=N), "a", turn_tokens(2, 5))
        seed_agent(s, make_model(window=L, passes=N), "b", turn_tokens(3, 5))
        s.enqueue_sleep("stranger")
        s.enqueue_sleep("a")
        s.enqueue_sleep("b", params={"passes": 0})
    args = ["sleep-worker", "--checkpoint", str(checkpoint), "--url", store_url, "--max-jobs", "2", "--poll", "0.01"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("job 2 agent a: done -> snapshot ")
    assert lines[1].startswith("job 3 agent b: failed: ")
    assert "2 jobs processed" in res.stderr
    with SnapshotStore(store_url) as s:
        assert [j.status for j in s.jobs("stranger")] == ["pending"]


def test_cli_help_and_errors(tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AGENTSLEEP_STORE_URL", raising=False)
    top = CliRunner().invoke(main, ["--help"])
    assert top.exit_code == 0 and "sleep-worker" in top.output
    res = CliRunner().invoke(main, ["sleep-worker", "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output
    for opt in ["--checkpoint", "--url", "--passes", "--poll", "--once", "--max-jobs", "--worker-id"]:
        assert opt in res.output
    assert not list(tmp_path.iterdir())  # --help opens no database

    bad_url = CliRunner().invoke(main, ["sleep-worker", "--checkpoint", str(checkpoint), "--url", "mysql://x/y"])
    assert bad_url.exit_code == 2 and bad_url.stderr.startswith("error: ") and len(bad_url.stderr.splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    no_model = CliRunner().invoke(main, ["sleep-worker", "--checkpoint", str(empty), "--once"])
    assert no_model.exit_code == 2 and no_model.stderr.startswith("error: ") and len(no_model.stderr.splitlines()) == 1
    missing = CliRunner().invoke(main, ["sleep-worker", "--once"])
    assert missing.exit_code == 2 and "--checkpoint" in missing.output
    zero = CliRunner().invoke(main, ["sleep-worker", "--checkpoint", str(checkpoint), "--passes", "0"])
    assert zero.exit_code == 2
