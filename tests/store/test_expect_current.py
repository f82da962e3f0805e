"""Compare-and-set saves: ``save(..., expect_current=id)`` writes only if ``id`` is still the agent's current snapshot,
atomically with respect to concurrent writers (the check runs under the agent's row lock)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

import agentsleep.errors
from agentsleep.errors import AgentSleepError, InvalidInput, SnapshotConflict, StoreError, UnknownAgent
from agentsleep.store import SnapshotRecord, SnapshotStore

from .helpers import toy_state


def test_conflict_is_a_typed_store_error() -> None:
    assert issubclass(SnapshotConflict, StoreError) and issubclass(SnapshotConflict, AgentSleepError)
    assert "SnapshotConflict" in agentsleep.errors.__all__


def test_save_with_the_current_id_succeeds_and_links_to_it(store: SnapshotStore) -> None:
    first = store.save("a", toy_state(1), [1, 2], reason="manual")
    second = store.save("a", toy_state(2), [], expect_current=first.id, passes=3, tokens_consolidated=2)
    assert second.parent_id == first.id and second.seq == 2
    assert store.agent("a").current_snapshot_id == second.id
    assert store.latest("a").state.digest() == toy_state(2).digest()


def test_a_stale_expectation_raises_and_writes_nothing(store: SnapshotStore) -> None:
    first = store.save("a", toy_state(1), [1, 2], reason="manual")
    newer = store.save("a", toy_state(2), [1, 2, 3], reason="turn")
    with pytest.raises(SnapshotConflict, match="moved on") as err:
        store.save("a", toy_state(3), [], reason="sleep", parent_id=first.id, expect_current=first.id)
    assert newer.id in str(err.value) and first.id in str(err.value)
    agent = store.agent("a")
    assert (agent.current_snapshot_id, agent.last_seq, agent.n_snapshots) == (newer.id, 2, 2)
    assert [r.id for r in store.history("a")] == [first.id, newer.id]
    assert store.latest("a").state.digest() == toy_state(2).digest()
    # the next save still gets the next sequence number: the failed one consumed nothing
    assert store.save("a", toy_state(4), expect_current=newer.id).seq == 3


def test_expecting_a_snapshot_of_an_agent_that_does_not_exist_creates_nothing(store: SnapshotStore) -> None:
    with pytest.raises(SnapshotConflict):
        store.save("ghost", toy_state(1), expect_current="0" * 32)
    with pytest.raises(UnknownAgent):
        store.agent("ghost")
    assert store.agents() == []


def test_expect_current_must_be_a_string(store: SnapshotStore) -> None:
    rec = store.save("a", toy_state(1))
    with pytest.raises(InvalidInput, match="expect_current"):
        store.save("a", toy_state(2), expect_current=123)  # type: ignore[arg-type]
    assert store.agent("a").current_snapshot_id == rec.id


def test_a_conflicting_save_to_blob_files_leaves_no_row(store_url: str, tmp_path) -> None:
    with SnapshotStore(store_url, blob_dir=str(tmp_path / "blobs"), inline_limit=0) as s:
        first = s.save("a", toy_state(1))
        newer = s.save("a", toy_state(2))
        with pytest.raises(SnapshotConflict):
            s.save("a", toy_state(3), expect_current=first.id)
        assert [r.id for r in s.history("a")] == [first.id, newer.id]
        assert s.gc_blobs(grace_s=0) == 1  # the orphaned payload file is collected like any other


def _race(store_url: str, expected: str, writers: int, start: threading.Barrier | None) -> list[object]:
    """``writers`` threads, each with its own store, save with ``expect_current=expected`` at once."""
    results: list[object] = [None] * writers

    def work(i: int) -> None:
        with SnapshotStore(store_url) as s:
            if start is not None:
                start.wait(10)
            try:
                results[i] = s.save("a", toy_state(100 + i), [i], reason="sleep", expect_current=expected)
            except SnapshotConflict as e:
                results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    return results


def test_concurrent_compare_and_set_saves_exactly_one_wins(store_url: str) -> None:
    writers = 6
    with SnapshotStore(store_url) as s:
        current = s.save("a", toy_state(1), reason="manual").id
    for _round in range(3):
        results = _race(store_url, current, writers, threading.Barrier(writers))
        wins = [r for r in results if isinstance(r, SnapshotRecord)]
        assert len(wins) == 1, results
        assert sum(isinstance(r, SnapshotConflict) for r in results) == writers - 1
        (win,) = wins
        i = results.index(win)
        with SnapshotStore(store_url) as s:
            assert s.agent("a").current_snapshot_id == win.id and win.parent_id == current
            got = s.latest("a")
            assert got.window == [i] and got.state.digest() == toy_state(100 + i).digest()
        current = win.id
    with SnapshotStore(store_url) as s:
        assert [r.seq for r in s.history("a")] == [1, 2, 3, 4]


@pytest.mark.postgres
def test_the_check_runs_under_the_agent_row_lock(postgres_schema_url: str) -> None:
    """Writers queued behind a held agent-row lock all expected the same snapshot; once the lock goes, the first one
    through wins and every later one sees its commit (READ COMMITTED re-reads the locked row) and conflicts."""
    writers = 4
    with SnapshotStore(postgres_schema_url) as s:
        current = s.save("a", toy_state(1), reason="manual").id
        results: list[list[object]] = []
        with s.engine.connect() as c, c.begin():
            c.execute(text("SELECT id FROM agents WHERE id = 'a' FOR UPDATE"))
            t = threading.Thread(target=lambda: results.append(_race(postgres_schema_url, current, writers, None)))
            t.start()
            time.sleep(1.0)  # let the writers reach the lock and queue behind it
            assert s.agent("a").current_snapshot_id == current  # nobody got past the lock
        t.join(60)
        (res,) = results
        wins = [r for r in res if isinstance(r, SnapshotRecord)]
        assert len(wins) == 1 and sum(isinstance(r, SnapshotConflict) for r in res) == writers - 1
        assert s.agent("a").current_snapshot_id == wins[0].id
        assert [r.seq for r in s.history("a")] == [1, 2]
