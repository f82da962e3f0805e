"""The three store pieces the server relies on, on SQLite and Postgres: `SnapshotStore.current_id` (the version read of
the resident memory), `find_by_metadata` (a turn id's earlier snapshot) and `NO_SNAPSHOT` (creating an agent as a
compare-and-set)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentsleep.errors import InvalidInput, SnapshotConflict
from agentsleep.store import SnapshotStore
from agentsleep.store.store import NO_SNAPSHOT
from tests.store.conftest import postgres_db, postgres_schema_url, postgres_server_url  # noqa: F401  (fixtures)

from .helpers import make_model, noise_state


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SnapshotStore]:
    url = (
        f"sqlite:///{tmp_path / 's.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_schema_url")
    )
    s = SnapshotStore(url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def state():
    return noise_state(make_model())


def test_current_id_follows_every_save(store: SnapshotStore, state) -> None:
    assert store.current_id("nobody") is None
    first = store.save("a", state, [5], reason="manual")
    assert store.current_id("a") == first.id
    second = store.save("a", state, [5, 6], reason="manual")
    assert store.current_id("a") == second.id
    store.set_current("a", first.id)  # a rewind moves it too
    assert store.current_id("a") == first.id
    with pytest.raises(InvalidInput):
        store.current_id(" a")


def test_find_by_metadata_finds_the_newest_match_of_one_agent(store: SnapshotStore, state) -> None:
    one = store.save("a", state, [5], reason="turn", metadata={"turn_id": "t1", "n": 1})
    two = store.save("a", state, [6], reason="turn", metadata={"turn_id": "t2"})
    store.save("b", state, [7], reason="turn", metadata={"turn_id": "t1"})  # another agent's t1
    again = store.save("a", state, [8], reason="turn", metadata={"turn_id": "t1"})
    assert store.find_by_metadata("a", "turn_id", "t1").id == again.id != one.id
    assert store.find_by_metadata("a", "turn_id", "t2").id == two.id
    assert store.find_by_metadata("a", "turn_id", "t3") is None and store.find_by_metadata("x", "turn_id", "t1") is None
    assert store.find_by_metadata("a", "n", "1") is None  # strings only: 1 is not "1"
    with pytest.raises(InvalidInput):
        store.find_by_metadata("a", "", "t1")


def test_no_snapshot_makes_creating_an_agent_a_compare_and_set(store: SnapshotStore, state) -> None:
    wins, losses = [], []

    def create(k: int) -> None:
        try:
            wins.append(store.save("new", state, [k], reason="turn", expect_current=NO_SNAPSHOT).id)
        except SnapshotConflict:
            losses.append(k)

    threads = [threading.Thread(target=create, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(wins) == 1 and len(losses) == 3  # exactly one creation; the others wrote nothing
    assert [r.id for r in store.history("new")] == wins and store.current_id("new") == wins[0]
    with pytest.raises(SnapshotConflict):
        store.save("new", state, [9], reason="turn", expect_current=NO_SNAPSHOT)
