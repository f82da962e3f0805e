"""Sleep jobs: enqueue (debounced per agent), claim (SKIP LOCKED on Postgres), complete, reclaim stale ones."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from sqlalchemy import text

from agentsleep.errors import InvalidInput, UnknownSnapshot
from agentsleep.store import SleepJobRecord, SnapshotStore

from .helpers import toy_state


def test_claim_by_model_fingerprint(store: SnapshotStore) -> None:
    store.save("a", toy_state(1))
    store.save("b", toy_state(2, fingerprint="other-model-fp"))
    ja, jb = store.enqueue_sleep("a"), store.enqueue_sleep("b")
    assert store.claim_job("w", fingerprint="no-such-model") is None
    got = store.claim_job("w", fingerprint="other-model-fp")
    assert got is not None and got.id == jb.id  # skips the older job of another model
    assert store.claim_job("w", fingerprint=toy_state(1).fingerprint).id == ja.id


def test_enqueue_claim_complete(store: SnapshotStore) -> None:
    r = store.save("a", toy_state(1))
    j = store.enqueue_sleep("a", params={"passes": 4})
    assert (j.status, j.agent_id, j.params, j.attempts) == ("pending", "a", {"passes": 4}, 0)
    assert store.enqueue_sleep("a").id == j.id  # one pending job per agent
    c = store.claim_job("worker-1")
    assert c is not None and (c.id, c.status, c.claimed_by, c.attempts) == (j.id, "running", "worker-1", 1)
    assert store.claim_job("worker-2") is None
    # a new sleep request while one runs is queued separately
    j2 = store.enqueue_sleep("a")
    assert j2.id != j.id
    done = store.complete_job(c.id, snapshot_id=r.id)
    assert (done.status, done.result_snapshot_id) == ("done", r.id) and done.finished_at is not None
    with pytest.raises(InvalidInput, match="not running"):
        store.complete_job(c.id)
    c2 = store.claim_job("worker-2")
    assert c2 is not None and c2.id == j2.id
    failed = store.complete_job(c2.id, error="out of memory")
    assert (failed.status, failed.error) == ("failed", "out of memory")
    assert [x.status for x in store.jobs("a")] == ["done", "failed"]
    with pytest.raises(InvalidInput):
        store.complete_job(12345)
    with pytest.raises(InvalidInput):
        store.enqueue_sleep("a", params={"bad": object()})


def test_complete_with_unknown_snapshot(store: SnapshotStore) -> None:
    store.save("a", toy_state(1))
    store.enqueue_sleep("a")
    c = store.claim_job("w")
    assert c is not None
    with pytest.raises(UnknownSnapshot):
        store.complete_job(c.id, snapshot_id="nope")
    assert store.jobs("a")[0].status == "running"


def test_stale_running_job_is_reclaimed(store: SnapshotStore) -> None:
    store.save("a", toy_state(1))
    store.enqueue_sleep("a")
    first = store.claim_job("dies")
    assert first is not None
    assert store.claim_job("other", stale_after_s=60) is None  # not stale yet
    time.sleep(0.05)
    again = store.claim_job("other", stale_after_s=0.01)
    assert again is not None and (again.id, again.claimed_by, again.attempts) == (first.id, "other", 2)


def test_concurrent_claimers_take_each_job_exactly_once(store_url: str) -> None:
    with SnapshotStore(store_url) as s:
        for i in range(20):
            s.save(f"agent-{i}", toy_state(i))
            s.enqueue_sleep(f"agent-{i}")
    claims: list[SleepJobRecord] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        with SnapshotStore(store_url) as s:
            while (job := s.claim_job(name)) is not None:
                with lock:
                    claims.append(job)
                s.complete_job(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(j.id for j in claims)
    assert len(counts) == 20 and set(counts.values()) == {1}
    with SnapshotStore(store_url) as s:
        assert {j.status for j in s.jobs()} == {"done"}


@pytest.mark.postgres
def test_claim_skips_rows_locked_by_another_worker(postgres_schema_url: str) -> None:
    """A worker holding job 1 (its claim transaction still open) does not block another, which gets job 2 at once."""
    with SnapshotStore(postgres_schema_url) as s:
        ids = []
        for i in range(2):
            s.save(f"agent-{i}", toy_state(i))
            ids.append(s.enqueue_sleep(f"agent-{i}").id)
        got: list[SleepJobRecord | None] = []
        with s.engine.connect() as c, c.begin():
            c.execute(text("SELECT id FROM sleep_jobs WHERE id = :id FOR UPDATE"), {"id": ids[0]})
            # in a thread, so a claimer that waits for our lock fails the test instead of hanging it
            t = threading.Thread(target=lambda: got.append(s.claim_job("second-worker")))
            t.start()
            t.join(timeout=5)
            assert not t.is_alive(), "claim_job waited for a locked job instead of skipping it"
        t.join()
        assert got[0] is not None and got[0].id == ids[1]
