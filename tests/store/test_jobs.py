"""Sleep jobs on procrastinate (Postgres): one waiting sleep per agent (queueing lock), one running per agent (lock),
one queue per model, typed errors, and SQLite refusing with a clear error. The workers that run the jobs are tested in
tests/memory/test_worker.py."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from agentsleep.errors import InvalidInput, UnknownAgent, UnsupportedBackend
from agentsleep.store import SleepJobRecord, SnapshotStore
from agentsleep.store.jobs import agent_lock, sleep_queue

from .helpers import toy_state


@pytest.fixture
def pg_store(postgres_schema_url: str):
    with SnapshotStore(postgres_schema_url) as s:
        yield s


def _rows(store: SnapshotStore) -> list[tuple]:
    with store.engine.connect() as c:
        return list(
            c.execute(text("SELECT id, status::text, lock, queueing_lock, queue_name, args FROM procrastinate_jobs"))
        )


@pytest.mark.postgres
def test_enqueue_defers_one_waiting_job_per_agent(pg_store: SnapshotStore) -> None:
    pg_store.save("a", toy_state(1))
    pg_store.save("b", toy_state(2))
    ja = pg_store.enqueue_sleep("a", passes=4)
    assert isinstance(ja, SleepJobRecord)
    assert (ja.agent_id, ja.status, ja.passes, ja.attempts, ja.queue) == ("a", "todo", 4, 0, sleep_queue("toy-abc"))
    again = pg_store.enqueue_sleep("a")  # one sleep waits per agent: the waiting one is the requested work
    assert again.id == ja.id and again.passes == 4
    jb = pg_store.enqueue_sleep("b")
    assert jb.id != ja.id and jb.passes is None
    rows = {r[0]: r for r in _rows(pg_store)}
    assert set(rows) == {ja.id, jb.id}
    _, status, lock, qlock, queue, args = rows[ja.id]
    assert (status, lock, qlock, queue, args) == ("todo", agent_lock("a"), agent_lock("a"), ja.queue, {
        "agent_id": "a",
        "passes": 4,
    })  # fmt: skip
    assert [j.id for j in pg_store.sleep_jobs()] == [ja.id, jb.id]
    assert [j.id for j in pg_store.sleep_jobs("b")] == [jb.id]


@pytest.mark.postgres
def test_a_running_sleep_lets_the_next_one_wait(pg_store: SnapshotStore) -> None:
    pg_store.save("a", toy_state(1))
    first = pg_store.enqueue_sleep("a")
    with pg_store.engine.begin() as c:  # a worker took it
        c.execute(text("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = :i"), {"i": first.id})
    second = pg_store.enqueue_sleep("a")
    assert second.id != first.id and second.status == "todo"
    assert pg_store.enqueue_sleep("a").id == second.id  # and still only one waits
    # procrastinate never starts a job whose lock has a running one: one agent's sleeps never run at once
    with pg_store.engine.begin() as c:
        c.execute(text("INSERT INTO procrastinate_workers DEFAULT VALUES"))
        wid = c.execute(text("SELECT max(id) FROM procrastinate_workers")).scalar_one()
        fetched = c.execute(text("SELECT id FROM procrastinate_fetch_job_v2(NULL, :w)"), {"w": wid}).scalar()
    assert fetched is None


@pytest.mark.postgres
def test_queues_follow_the_model(pg_store: SnapshotStore) -> None:
    pg_store.save("a", toy_state(1))
    pg_store.save("b", toy_state(2, fingerprint="other-model-fp"))
    ja, jb = pg_store.enqueue_sleep("a"), pg_store.enqueue_sleep("b")
    assert ja.queue == sleep_queue("toy-abc") != jb.queue == sleep_queue("other-model-fp")
    assert len(ja.queue) <= 40  # procrastinate's NOTIFY channel = 23-char prefix + queue, within Postgres' 63


@pytest.mark.postgres
def test_bad_requests_and_deleted_agents(pg_store: SnapshotStore) -> None:
    with pytest.raises(UnknownAgent):
        pg_store.enqueue_sleep("ghost")
    pg_store.save("a", toy_state(1))
    for bad in [0, -1, 2**31, True, "4", 1.5]:
        with pytest.raises(InvalidInput):
            pg_store.enqueue_sleep("a", passes=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        pg_store.enqueue_sleep("a\x00")
    assert pg_store.sleep_jobs() == []
    pg_store.enqueue_sleep("a")
    pg_store.delete_agent("a")
    assert pg_store.sleep_jobs() == [] and _rows(pg_store) == []


def test_sqlite_has_no_queue_and_says_so(tmp_path) -> None:
    with SnapshotStore(f"sqlite:///{tmp_path / 's.db'}") as s:
        s.save("a", toy_state(1))
        with pytest.raises(UnsupportedBackend, match="Postgres"):
            s.enqueue_sleep("a")
        assert s.sleep_jobs() == [] and s.sleep_jobs("a") == []
