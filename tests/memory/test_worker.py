"""Sleep workers: `consolidate` is the engine's own sleep saved as a compare-and-set (a newer snapshot is never
overwritten; SQLite and Postgres), and `SleepWorker` runs it from procrastinate's queue on Postgres: each job done
once by any number of workers, store errors retried with backoff, bad jobs failed with their error, a killed worker's
job taken over once its heartbeat stops, and SQLite refused with a typed error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select, text, update

from agentsleep.cli import main
from agentsleep.errors import InvalidInput, SnapshotConflict, StoreError, UnknownAgent, UnsupportedBackend
from agentsleep.memory import SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.memory.worker import JobReport, SleepWorker, consolidate
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.runtime import SamplingParams, TorchEngine, memory_from_snapshot, save_memory
from agentsleep.store import Snapshot, SnapshotRecord, SnapshotStore
from tests.runtime.helpers import make_model, turn_tokens

from . import worker_child

L, N = 16, 3
ROOT = Path(__file__).resolve().parents[2]
FAST = {"heartbeat_s": 0.3, "stalled_after_s": 2.0, "retry_backoff_s": 0.05, "poll_s": 0.1}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_schema_url")


@pytest.fixture
def store(store_url: str) -> Iterator[SnapshotStore]:
    with SnapshotStore(store_url) as s:
        yield s


@pytest.fixture
def pg(postgres_schema_url: str) -> Iterator[SnapshotStore]:
    with SnapshotStore(postgres_schema_url) as s:
        yield s


@pytest.fixture(scope="module")
def model() -> SleepHybrid:
    return make_model(window=L, passes=N)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, model: SleepHybrid) -> Path:
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "toy")


def seed_agent(store: SnapshotStore, model: SleepHybrid, agent_id: str, tokens: list[int]) -> SnapshotRecord:
    """An agent whose current snapshot holds ``tokens`` in its window (as a host's turn snapshot would)."""
    engine = TorchEngine(model)
    engine.create_agent(agent_id)
    if tokens:
        engine.observe(agent_id, tokens)
    return save_memory(store, agent_id, engine.export_state(agent_id), reason="turn", passes=N)


def sleeps(store: SnapshotStore, agent_id: str) -> list[SnapshotRecord]:
    return [r for r in store.history(agent_id) if r.reason == "sleep"]


def job_rows(store: SnapshotStore) -> dict[int, tuple[str, int]]:
    """procrastinate's view: job id -> (status, attempts)."""
    with store.engine.connect() as c:
        rows = c.execute(text("SELECT id, status::text, attempts FROM procrastinate_jobs ORDER BY id")).all()
    return {r[0]: (r[1], r[2]) for r in rows}


def started_events(store: SnapshotStore) -> Counter[int]:
    """How many times each job was started (procrastinate records every todo -> doing)."""
    with store.engine.connect() as c:
        rows = c.execute(text("SELECT job_id FROM procrastinate_events WHERE type = 'started'")).scalars().all()
    return Counter(rows)


# ---------------------------------------------------------------------------------------------- the work itself


def test_consolidation_is_the_engines_sleep_and_a_revived_agent_continues_from_it(
    store: SnapshotStore, model: SleepHybrid
) -> None:
    policy = SleepPolicy(window=L, passes=N, soft_threshold=1.0, debounce_seconds=0.0)
    with AgentHost(TorchEngine(model), store, policy, background=False, snapshot_turns=True) as host:
        host.create("a")
        host.observe("a", turn_tokens(1, 10))
        host.sleep_now("a")  # a sleep by the host itself: the conventions a worker must follow
        host.turn("a", turn_tokens(2, 5), max_new_tokens=3)  # then a turn, snapshotted with its window
        host.park("a", sleep=False)
    host_sleep = sleeps(store, "a")[-1]
    turn = store.latest("a")
    assert turn.record.reason == "turn" and len(turn.window) == 8 and turn.record.tokens_consolidated == 10

    ref = TorchEngine(model)  # the reference: the same memory imported into an engine and slept there
    ref.import_state("ref", memory_from_snapshot(store.load(turn.record.id)))
    expected = ref.sleep("ref", 2)
    assert expected.tokens == 8

    engine = TorchEngine(model)
    done = consolidate(engine, store, "a", passes=2, worker_id="w-1", job_id=7)
    assert engine.agent_ids() == []  # the private agent is gone again
    assert (done.parent_id, done.tokens, done.passes, done.tries) == (turn.record.id, 8, 2, 1)
    new = store.latest("a", fingerprint=model.fingerprint)
    rec = new.record
    assert rec.id == done.snapshot_id == store.current_id("a")
    ref_state = ref.export_state("ref").state
    assert all(torch.equal(x, y) for x, y in zip(new.state.ssm, ref_state.ssm, strict=True))
    assert new.window == []
    assert (rec.reason, rec.parent_id, rec.passes, rec.tokens_consolidated) == ("sleep", turn.record.id, 2, 18)
    assert rec.meta["sleep_count"] == host_sleep.meta["sleep_count"] + 1 == 2
    assert rec.meta["tokens_seen"] == turn.record.meta["tokens_seen"] == 18
    assert (rec.meta["trigger"], rec.meta["window_tokens_slept"]) == ("sleep", 8)
    assert (rec.meta["worker_id"], rec.meta["job_id"]) == ("w-1", 7)
    assert set(host_sleep.meta) <= set(rec.meta)

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


def test_an_empty_window_is_nothing_to_do(store: SnapshotStore, model: SleepHybrid) -> None:
    first = seed_agent(store, model, "a", [])
    done = consolidate(TorchEngine(model), store, "a")
    assert (done.snapshot_id, done.parent_id, done.tokens) == (None, first.id, 0)
    assert [r.id for r in store.history("a")] == [first.id]


def test_a_turn_saved_meanwhile_is_consolidated_instead_never_overwritten(
    store: SnapshotStore, model: SleepHybrid
) -> None:
    seed_agent(store, model, "a", turn_tokens(1, 6))
    user = TorchEngine(model)
    user.import_state("a", memory_from_snapshot(store.latest("a")))
    newer: list[SnapshotRecord] = []
    engine = TorchEngine(make_model(window=L, passes=N))  # its own copy of the model, patched below
    real = engine.model.sleep_window

    def a_turn_lands_during_the_first_sleep(cache, passes=None):  # between the worker's load and its save
        if not newer:
            user.observe("a", turn_tokens(2, 3))
            newer.append(save_memory(store, "a", user.export_state("a"), reason="turn", passes=N))
        return real(cache, passes)

    engine.model.sleep_window = a_turn_lands_during_the_first_sleep  # type: ignore[method-assign]
    done = consolidate(engine, store, "a")
    assert done.tries == 2 and done.parent_id == newer[0].id  # reloaded the newer turn and consolidated that
    rec = store.get(done.snapshot_id)
    assert rec.parent_id == newer[0].id and rec.tokens_consolidated == 9
    assert [r.reason for r in store.history("a")] == ["turn", "turn", "sleep"]


def test_a_writer_that_always_wins_makes_consolidation_give_up(store: SnapshotStore, model: SleepHybrid) -> None:
    seed_agent(store, model, "a", turn_tokens(1, 6))
    user = TorchEngine(model)
    user.import_state("a", memory_from_snapshot(store.latest("a")))
    engine = TorchEngine(make_model(window=L, passes=N))
    real = engine.model.sleep_window

    def a_turn_lands_every_time(cache, passes=None):
        user.observe("a", turn_tokens(9, 1))
        save_memory(store, "a", user.export_state("a"), reason="turn", passes=N)
        return real(cache, passes)

    engine.model.sleep_window = a_turn_lands_every_time  # type: ignore[method-assign]
    with pytest.raises(SnapshotConflict, match="moved on 3 times"):
        consolidate(engine, store, "a")
    assert sleeps(store, "a") == [] and engine.agent_ids() == []


def test_bad_requests(store: SnapshotStore, model: SleepHybrid) -> None:
    with pytest.raises(UnknownAgent):
        consolidate(TorchEngine(model), store, "ghost")
    seed_agent(store, model, "a", turn_tokens(1, 5))
    for bad in [0, -1, "4", True]:
        with pytest.raises(InvalidInput):
            consolidate(TorchEngine(model), store, "a", passes=bad)  # type: ignore[arg-type]
    assert sleeps(store, "a") == []


def test_workers_need_postgres(tmp_path: Path, model: SleepHybrid) -> None:
    with SnapshotStore(f"sqlite:///{tmp_path / 's.db'}") as s:
        with pytest.raises(UnsupportedBackend, match="Postgres"):
            SleepWorker(TorchEngine(model), s)


# ---------------------------------------------------------------------------------------------- the queue (Postgres)


@pytest.mark.postgres
def test_a_worker_runs_queued_sleeps_with_the_jobs_passes(pg: SnapshotStore, model: SleepHybrid) -> None:
    for i, passes in enumerate([1, None]):
        seed_agent(pg, model, f"a{i}", turn_tokens(i, 6))
        pg.enqueue_sleep(f"a{i}", passes=passes)
    reports: list[JobReport] = []
    worker = SleepWorker(TorchEngine(model, passes=4), pg, worker_id="w", passes=2, **FAST)
    assert worker.run(wait=False, on_job=reports.append) == 2
    assert [(r.agent_id, r.status, r.attempt) for r in reports] == [("a0", "succeeded", 1), ("a1", "succeeded", 1)]
    assert [sleeps(pg, f"a{i}")[0].passes for i in range(2)] == [1, 2]  # the job's N, else the worker's
    for r in reports:
        rec = pg.get(r.snapshot_id)
        assert (rec.meta["job_id"], rec.meta["worker_id"]) == (r.job_id, "w")
        assert r.line() == f"job {r.job_id} agent {r.agent_id}: succeeded -> snapshot {r.snapshot_id}"
    assert {s for s, _ in job_rows(pg).values()} == {"succeeded"}
    assert worker.run_once() is None  # nothing left
    seed_agent(pg, model, "a2", turn_tokens(2, 6))
    pg.enqueue_sleep("a2")
    SleepWorker(TorchEngine(model, passes=4), pg, **FAST).run_once()
    assert sleeps(pg, "a2")[0].passes == 4  # else the engine's


def _flip_payload(store: SnapshotStore, snapshot_id: str) -> None:
    with store.engine.begin() as c:
        data = bytearray(c.execute(select(Snapshot.payload).where(Snapshot.id == snapshot_id)).scalar_one())
        data[len(data) // 2] ^= 0x01
        c.execute(update(Snapshot).where(Snapshot.id == snapshot_id).values(payload=bytes(data)))


@pytest.mark.postgres
def test_bad_jobs_fail_with_their_error_and_the_worker_goes_on(pg: SnapshotStore, model: SleepHybrid) -> None:
    corrupt = seed_agent(pg, model, "corrupt", turn_tokens(1, 5))
    _flip_payload(pg, corrupt.id)
    other = make_model(window=L, passes=N, seed=1)
    seed_agent(pg, other, "other-model", turn_tokens(2, 5))
    seed_agent(pg, model, "doomed", turn_tokens(3, 5))
    good = seed_agent(pg, model, "good", turn_tokens(4, 5))
    for agent in ["corrupt", "other-model", "doomed", "good"]:
        pg.enqueue_sleep(agent)
    with pg.engine.begin() as c:  # a job whose arguments are not ours to trust
        c.execute(text("UPDATE procrastinate_jobs SET args = jsonb_set(args, '{passes}', '\"four\"') WHERE id = 3"))
    engine = TorchEngine(model)
    reports: list[JobReport] = []
    SleepWorker(engine, pg, worker_id="w", **FAST).run(wait=False, on_job=reports.append)
    by_agent = {r.agent_id: r for r in reports}
    assert set(by_agent) == {"corrupt", "doomed", "good"}  # another model's job is in another queue
    assert by_agent["corrupt"].status == "failed" and by_agent["corrupt"].error.startswith("SnapshotCorrupt: ")
    assert by_agent["doomed"].status == "failed" and "passes must be an int >= 1" in by_agent["doomed"].error
    assert by_agent["good"].status == "succeeded" and pg.get(by_agent["good"].snapshot_id).parent_id == good.id
    assert pg.current_id("corrupt") == corrupt.id and engine.agent_ids() == []
    assert [j.status for j in pg.sleep_jobs("other-model")] == ["todo"]
    theirs = SleepWorker(TorchEngine(other), pg, worker_id="w2", **FAST).run_once()
    assert theirs is not None and (theirs.agent_id, theirs.status) == ("other-model", "succeeded")
    statuses = {j.agent_id: (j.status, j.attempts) for j in pg.sleep_jobs()}
    assert statuses["corrupt"] == ("failed", 1) and statuses["doomed"] == ("failed", 1)  # not retried


@pytest.mark.postgres
def test_a_transient_store_error_is_retried_with_backoff(pg: SnapshotStore, model: SleepHybrid) -> None:
    seed_agent(pg, model, "a", turn_tokens(1, 5))
    job = pg.enqueue_sleep("a")
    real = pg.latest
    failures = [StoreError("snapshot store database error: server closed the connection (injected)")] * 2

    def flaky(*args, **kwargs):  # the database goes away for two attempts
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    pg.latest = flaky  # type: ignore[method-assign]
    reports: list[JobReport] = []
    worker = SleepWorker(TorchEngine(model), pg, worker_id="w", **FAST)
    t0 = time.monotonic()
    worker.run(max_jobs=3, on_job=reports.append)
    assert [(r.status, r.attempt) for r in reports] == [("retry", 1), ("retry", 2), ("succeeded", 3)]
    assert reports[0].error.startswith("StoreError: ") and time.monotonic() - t0 >= 0.05 + 0.1  # backoff 0.05, 0.1
    assert job_rows(pg)[job.id] == ("succeeded", 3) and len(sleeps(pg, "a")) == 1


@pytest.mark.postgres
def test_retries_stop_at_max_attempts_and_a_deleted_agent_fails(pg: SnapshotStore, model: SleepHybrid) -> None:
    seed_agent(pg, model, "a", turn_tokens(1, 5))
    pg.enqueue_sleep("a")

    def down(*args, **kwargs):
        raise StoreError("the store is down (injected)")

    real = pg.latest
    pg.latest = down  # type: ignore[method-assign]
    reports: list[JobReport] = []
    SleepWorker(TorchEngine(model), pg, max_attempts=2, **FAST).run(max_jobs=2, on_job=reports.append)
    assert [r.status for r in reports] == ["retry", "failed"]
    pg.latest = real  # type: ignore[method-assign]
    seed_agent(pg, model, "gone", turn_tokens(2, 5))
    pg.enqueue_sleep("gone")
    with pg.engine.begin() as c:  # deleted after its job was queued (delete_agent would also drop the job)
        c.execute(text("UPDATE agents SET current_snapshot_id = NULL WHERE id = 'gone'"))
        c.execute(text("DELETE FROM snapshots WHERE agent_id = 'gone'"))
        c.execute(text("DELETE FROM agents WHERE id = 'gone'"))
    r = SleepWorker(TorchEngine(model), pg, **FAST).run_once()
    assert r is not None and r.status == "failed" and r.error.startswith("UnknownAgent: ")


def _stall(store: SnapshotStore, job_id: int) -> None:
    """Make ``job_id`` look like it was taken by a worker that died long ago."""
    with store.engine.begin() as c:
        wid = c.execute(
            text("INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - interval '1 hour') RETURNING id")
        ).scalar_one()
        doing = text("UPDATE procrastinate_jobs SET status = 'doing', worker_id = :w WHERE id = :i")
        c.execute(doing, {"w": wid, "i": job_id})


@pytest.mark.postgres
def test_stalled_jobs_are_recovered_once(pg: SnapshotStore, model: SleepHybrid) -> None:
    for agent in ["a", "b", "c"]:
        seed_agent(pg, model, agent, turn_tokens(len(agent), 5))
    ja, jb, jc = (pg.enqueue_sleep(a) for a in ["a", "b", "c"])
    for j in (ja, jb, jc):
        _stall(pg, j.id)
    waiting = pg.enqueue_sleep("b")  # b's next sleep already waits: it covers the stalled one
    with pg.engine.begin() as c:
        c.execute(text("UPDATE procrastinate_jobs SET attempts = 4 WHERE id = :i"), {"i": jc.id})  # c: out of tries
    worker = SleepWorker(TorchEngine(model), pg, **FAST)
    assert worker.recover_stalled() == 1  # only a goes back to the queue
    assert worker.recover_stalled() == 0  # and only once
    rows = job_rows(pg)
    assert rows[ja.id] == ("todo", 1) and rows[jb.id][0] == "failed" and rows[jc.id][0] == "failed"
    assert rows[waiting.id] == ("todo", 0)
    reports: list[JobReport] = []
    worker.run(wait=False, on_job=reports.append)
    assert sorted((r.agent_id, r.status) for r in reports) == [("a", "succeeded"), ("b", "succeeded")]


@pytest.mark.postgres
def test_a_retry_that_meets_a_waiting_sleep_fails_instead_of_sticking(pg: SnapshotStore, model: SleepHybrid) -> None:
    seed_agent(pg, model, "a", turn_tokens(1, 5))
    first = pg.enqueue_sleep("a")
    real = pg.latest
    waiting: list[int] = []

    def queue_another_then_fail(*args, **kwargs):
        if not waiting:
            waiting.append(pg.enqueue_sleep("a").id)  # while the first runs, the next one waits
            raise StoreError("injected")
        return real(*args, **kwargs)

    pg.latest = queue_another_then_fail  # type: ignore[method-assign]
    SleepWorker(TorchEngine(model), pg, **FAST).run(wait=False)
    rows = job_rows(pg)
    assert rows[first.id][0] == "failed"  # its retry would be a second waiting sleep: the waiting one covers it
    assert rows[waiting[0]][0] == "succeeded" and len(sleeps(pg, "a")) == 1


@pytest.mark.postgres
def test_workers_share_the_queue_each_job_done_exactly_once(postgres_schema_url: str, model: SleepHybrid) -> None:
    n, workers = 24, 2  # tests/reliability runs 4 workers x 200 jobs
    with SnapshotStore(postgres_schema_url) as s:
        seeded = {f"agent-{i}": seed_agent(s, model, f"agent-{i}", turn_tokens(i, 4 + i % 5)).id for i in range(n)}
        jobs = {s.enqueue_sleep(a).id: a for a in seeded}
    engine = TorchEngine(model)  # shared: each job's agent lives under its own private id
    done: dict[str, list[JobReport]] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def work(name: str) -> None:
        try:
            with SnapshotStore(postgres_schema_url) as s:
                mine: list[JobReport] = []
                SleepWorker(engine, s, worker_id=name, **FAST).run(stop=stop, on_job=mine.append)
                done[name] = mine
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    with SnapshotStore(postgres_schema_url) as s:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(st in ("todo", "doing") for st, _ in job_rows(s).values()):
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads)
        reports = [r for mine in done.values() for r in mine]
        assert sorted(r.job_id for r in reports) == sorted(jobs)  # every job reported once, by one worker
        assert set(started_events(s).values()) == {1} and set(started_events(s)) == set(jobs)
        assert set(job_rows(s).values()) == {("succeeded", 1)}
        for r in reports:
            (slept,) = sleeps(s, r.agent_id)
            assert slept.id == r.snapshot_id == s.current_id(r.agent_id)
            assert slept.parent_id == seeded[r.agent_id] and slept.meta["job_id"] == r.job_id
    assert engine.agent_ids() == []


@pytest.mark.postgres
def test_a_killed_workers_job_is_done_by_another_within_the_stalled_timeout(
    postgres_schema_url: str, model: SleepHybrid, checkpoint: Path
) -> None:
    with SnapshotStore(postgres_schema_url) as s:
        seed = seed_agent(s, model, "a", turn_tokens(1, 9))
        job = s.enqueue_sleep("a")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "tests.memory.worker_child", postgres_schema_url, str(checkpoint), "30", "victim"]
        victim = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert victim.stdout is not None
            line = ""
            deadline = time.monotonic() + 120
            while "sleeping victim" not in line and time.monotonic() < deadline:
                line = victim.stdout.readline()
                assert line or victim.poll() is None, "the worker process died before taking the job"
            assert job_rows(s)[job.id][0] == "doing"
            os.kill(victim.pid, signal.SIGKILL)  # mid-sleep
            killed_at = time.monotonic()
        finally:
            if victim.poll() is None:
                victim.kill()
            victim.wait(30)
        reports: list[JobReport] = []
        heir = SleepWorker(TorchEngine(model), s, worker_id="heir", heartbeat_s=0.3, stalled_after_s=2.0, poll_s=0.1)
        heir.run(max_jobs=1, on_job=reports.append)
        took = time.monotonic() - killed_at
        assert [(r.job_id, r.status, r.attempt) for r in reports] == [(job.id, "succeeded", 2)]
        assert took < worker_child.STALLED_AFTER_S + 15  # the stalled timeout, plus a heartbeat and slack for CI
        assert job_rows(s)[job.id] == ("succeeded", 2)
        (slept,) = sleeps(s, "a")
        assert slept.parent_id == seed.id and slept.meta["worker_id"] == "heir"


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.postgres
def test_cli_once_and_max_jobs(postgres_schema_url: str, checkpoint: Path, model: SleepHybrid) -> None:
    with SnapshotStore(postgres_schema_url) as s:
        seed = seed_agent(s, model, "a", turn_tokens(1, 7))
        ja = s.enqueue_sleep("a", passes=2)
    args = ["sleep-worker", "--checkpoint", str(checkpoint), "--url", postgres_schema_url, "--worker-id", "cli-1"]
    res = CliRunner().invoke(main, [*args, "--once"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    with SnapshotStore(postgres_schema_url) as s:
        (rec,) = sleeps(s, "a")
        assert (rec.parent_id, rec.passes, rec.meta["worker_id"], rec.meta["job_id"]) == (seed.id, 2, "cli-1", ja.id)
    assert res.stdout.strip() == f"job {ja.id} agent a: succeeded -> snapshot {rec.id}"
    assert "sleep-worker cli-1: model " in res.stderr
    again = CliRunner().invoke(main, [*args, "--once"], catch_exceptions=False)
    assert again.exit_code == 0 and "no waiting sleep job" in again.stdout
    with SnapshotStore(postgres_schema_url) as s:
        seed_agent(s, model, "b", turn_tokens(2, 5))
        seed_agent(s, model, "c", turn_tokens(3, 5))
        jb, jc = s.enqueue_sleep("b"), s.enqueue_sleep("c", passes=1)
    res = CliRunner().invoke(main, [*args, "--max-jobs", "2", "--heartbeat", "0.5", "--stalled-after", "2"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [f"job {jb.id} agent b", f"job {jc.id} agent c"]
    assert "2 job attempts processed" in res.stderr


def test_cli_help_and_errors(tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AGENTSLEEP_STORE_URL", raising=False)
    top = CliRunner().invoke(main, ["--help"])
    assert top.exit_code == 0 and "sleep-worker" in top.output
    res = CliRunner().invoke(main, ["sleep-worker", "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output
    for opt in ["--checkpoint", "--url", "--passes", "--once", "--max-jobs", "--heartbeat", "--stalled-after"]:
        assert opt in res.output
    assert not list(tmp_path.iterdir())  # --help opens no database

    def one_line_error(args: list[str], code: int) -> str:
        r = CliRunner().invoke(main, ["sleep-worker", "--checkpoint", str(checkpoint), *args])
        assert r.exit_code == code, r.output
        assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
        return r.stderr

    assert "Postgres" in one_line_error(["--url", f"sqlite:///{tmp_path / 'x.db'}"], 2)  # no workers on SQLite
    assert "Postgres" in one_line_error([], 2)  # the default URL is SQLite
    one_line_error(["--url", "mysql://x/y"], 2)
    one_line_error(["--url", "postgresql+psycopg://nobody:wrong@127.0.0.1:1/none"], 5)
    assert not list(tmp_path.iterdir())  # and none of that created a file
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = CliRunner().invoke(main, ["sleep-worker", "--once"])
    assert missing.exit_code == 2 and "--checkpoint" in missing.output
    zero = CliRunner().invoke(main, ["sleep-worker", "--checkpoint", str(checkpoint), "--passes", "0"])
    assert zero.exit_code == 2


@pytest.mark.postgres
def test_cli_passes_auto(postgres_schema_url: str, checkpoint: Path, model: SleepHybrid) -> None:
    """`--passes auto` gives jobs that name no depth an adaptive sleep capped by `--max-passes`; the depth it ran is
    recorded. A depth that is neither a number nor 'auto' is a usage error."""
    with SnapshotStore(postgres_schema_url) as s:
        seed_agent(s, model, "a", turn_tokens(1, 7))
        s.enqueue_sleep("a")
    args = ["sleep-worker", "--checkpoint", str(checkpoint), "--url", postgres_schema_url, "--once"]
    res = CliRunner().invoke(main, [*args, "--passes", "auto", "--max-passes", "3", "--tol", "0.5"])
    assert res.exit_code == 0, res.output
    assert "auto(max 3" in res.stderr  # the worker's banner names the engine's depth
    with SnapshotStore(postgres_schema_url) as s:
        (rec,) = sleeps(s, "a")
        assert 1 <= rec.passes <= 3
    bad = CliRunner().invoke(main, [*args, "--passes", "two"])
    assert bad.exit_code == 2 and "neither a whole number of passes nor 'auto'" in bad.output
