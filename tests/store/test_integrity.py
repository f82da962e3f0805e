"""What the store refuses and what it survives: edited rows (record checksum), a corrupt current snapshot under prune,
a dangling current pointer, values the database could not hold, and SQLite files that are not stores. Every case
raises a typed error — the same one on SQLite and Postgres — and loses nothing."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
import torch
from sqlalchemy import select, text, update

from agentsleep.errors import InvalidInput, SnapshotCorrupt, StoreError, UnknownSnapshot
from agentsleep.model.state import FastWeights
from agentsleep.store import MAX_WINDOW_TOKENS, Snapshot, SnapshotStore

from .helpers import toy_state


def _set(store: SnapshotStore, snapshot_id: str, **values: object) -> None:
    with store.engine.begin() as c:
        c.execute(update(Snapshot).where(Snapshot.id == snapshot_id).values(**values))


def _flip_payload(store: SnapshotStore, snapshot_id: str) -> None:
    with store.engine.begin() as c:
        data = bytearray(c.execute(select(Snapshot.payload).where(Snapshot.id == snapshot_id)).scalar_one())
        data[len(data) // 2] ^= 0x10
        c.execute(update(Snapshot).where(Snapshot.id == snapshot_id).values(payload=bytes(data)))


# ---------------------------------------------------------------------------------------------- record checksum


@pytest.mark.parametrize(
    "edit",
    [
        {"tokens_consolidated": 999},
        {"passes": 7},
        {"reason": "manual"},
        {"window_len": 3},
        {"thread_id": "other"},
        {"meta": {"sleep_count": 99, "tokens_seen": 3}},
        {"seq": 50},
        {"record_sha256": None},
    ],
    ids=lambda e: next(iter(e)),
)
def test_an_edited_row_field_is_corrupt(store: SnapshotStore, edit: dict[str, object]) -> None:
    first = store.save("a", toy_state(1), [1, 2], thread_id="t", metadata={"sleep_count": 1, "tokens_seen": 2})
    rec = store.save("a", toy_state(2), [1, 2], passes=2, tokens_consolidated=10, thread_id="t",
                     metadata={"sleep_count": 1, "tokens_seen": 12})  # fmt: skip
    _set(store, rec.id, **edit)
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        store.load(rec.id)
    with pytest.raises(SnapshotCorrupt):
        store.latest("a")
    assert store.latest("a", fallback=True).record.id == first.id  # the older, intact one is served
    assert store.get(rec.id).id == rec.id  # metadata listings still work (they never verify)


def test_an_edited_parent_link_is_corrupt(store: SnapshotStore) -> None:
    a = store.save("a", toy_state(1))
    b = store.save("a", toy_state(2))
    c = store.save("a", toy_state(3))
    _set(store, c.id, parent_id=a.id)  # claims another lineage
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        store.load(c.id)
    assert store.load(b.id).record.parent_id == a.id


def test_prune_reseals_children_and_never_launders_a_damaged_row(store: SnapshotStore) -> None:
    recs = [store.save("p", toy_state(i)) for i in range(4)]
    fork = store.fork(recs[0].id, "child")
    _set(store, recs[2].id, tokens_consolidated=5)  # recs[2] was edited: its parent link will be cut by the prune
    assert store.prune("p", keep=2) == 2  # deletes recs[0] (fork's parent) and recs[1] (recs[2]'s parent)
    child = store.load(fork.id)  # re-sealed with parent NULL: still verifies
    assert child.record.parent_id is None
    assert store.get(recs[2].id).parent_id is None
    with pytest.raises(SnapshotCorrupt):  # not made to look sound by the re-seal
        store.load(recs[2].id)
    assert store.load(recs[3].id).record.parent_id == recs[2].id
    store.delete_agent("child")
    store.delete_agent("p")


# ---------------------------------------------------------------------------------------------- prune keeps a good one


def test_prune_never_deletes_the_last_snapshot_that_verifies(store: SnapshotStore) -> None:
    good = [store.save("a", toy_state(i), [i]) for i in range(4)]
    bad = store.save("a", toy_state(9), [9])
    _flip_payload(store, bad.id)
    served = store.latest("a", fallback=True)
    assert served.record.id == good[-1].id
    assert [r.id for r in store.prune_candidates("a", keep=1)] == [r.id for r in good[:-1]]
    assert store.prune("a", keep=1) == 3
    assert [r.id for r in store.history("a")] == [good[-1].id, bad.id]
    assert store.latest("a", fallback=True).state.digest() == toy_state(3).digest()
    assert store.prune("a", keep=0) == 0  # the current (corrupt) one and the last good one both stay
    # once the current snapshot verifies again, the old good one is an ordinary prune victim
    fixed = store.save("a", toy_state(10))
    assert store.prune("a", keep=1) == 2 and [r.id for r in store.history("a")] == [fixed.id]


def test_prune_with_nothing_verifying_still_prunes(store: SnapshotStore) -> None:
    recs = [store.save("a", toy_state(i)) for i in range(3)]
    for r in recs:
        _flip_payload(store, r.id)
    assert store.prune("a", keep=1) == 2


# ---------------------------------------------------------------------------------------------- dangling pointer


def _dangle(store: SnapshotStore, agent: str) -> str:
    """Delete the agent's current snapshot behind the store's back, foreign keys off (as a sqlite3 shell does)."""
    current = store.agent(agent).current_snapshot_id
    assert current is not None
    if store.dialect == "sqlite":
        con = sqlite3.connect(store.engine.url.database)
        con.execute("PRAGMA foreign_keys = OFF")
        con.execute("UPDATE snapshots SET parent_id = NULL WHERE parent_id = ?", (current,))
        con.execute("DELETE FROM snapshots WHERE id = ?", (current,))
        con.commit()
        con.close()
    else:
        with store.engine.begin() as c:
            c.execute(text("ALTER TABLE agents DROP CONSTRAINT fk_agents_current_snapshot_id_snapshots"))
            c.execute(text("UPDATE snapshots SET parent_id = NULL WHERE parent_id = :i"), {"i": current})
            c.execute(text("DELETE FROM snapshots WHERE id = :i"), {"i": current})
    return current


def test_a_dangling_current_pointer_breaks_neither_fallback_nor_later_saves(store: SnapshotStore) -> None:
    older = store.save("a", toy_state(1), [1])
    store.save("a", toy_state(2), [2])
    gone = _dangle(store, "a")
    assert store.current_id("a") == gone
    with pytest.raises(SnapshotCorrupt, match="missing"):
        store.latest("a")
    got = store.latest("a", fallback=True)
    assert got.record.id == older.id and got.state.digest() == toy_state(1).digest()
    assert [r.id for r in store.prune_candidates("a", keep=1)] == []
    new = store.save("a", toy_state(3))  # no FK failure: a fresh lineage
    assert new.parent_id is None and store.latest("a").record.id == new.id
    assert store.save("a", toy_state(4), expect_current=new.id).parent_id == new.id


def test_current_id_is_cheap_and_exact(store: SnapshotStore) -> None:
    assert store.current_id("ghost") is None  # the version read of a cache: no agent, no current snapshot
    with pytest.raises(InvalidInput):
        store.current_id(" ghost")
    r = store.save("a", toy_state(1))
    assert store.current_id("a") == r.id
    r2 = store.save("a", toy_state(2), expect_current=store.current_id("a"))
    assert store.current_id("a") == r2.id


# ---------------------------------------------------------------------------------------------- values


def _with(t: torch.Tensor) -> FastWeights:
    st = toy_state(1)
    return FastWeights(ssm=[t, st.ssm[1]], fingerprint=st.fingerprint)


def test_states_the_store_refuses(store: SnapshotStore) -> None:
    base = toy_state(1).ssm[0]
    nan, inf = base.clone(), base.clone()
    nan[0, 0, 0, 0] = math.nan
    inf[0, 1, 2, 3] = -math.inf
    cases = {
        "NaN": _with(nan),
        "inf": _with(inf),
        "float64": _with(base.double()),
        "bfloat16": _with(base.bfloat16()),
        "batch 2": FastWeights(ssm=[torch.cat([base, base])] * 2, fingerprint="toy-abc"),
        "bad fingerprint": FastWeights(ssm=toy_state(1).ssm, fingerprint="x\n"),
        "long fingerprint": FastWeights(ssm=toy_state(1).ssm, fingerprint="f" * 129),
    }
    for what, st in cases.items():
        with pytest.raises(InvalidInput):
            store.save("a", st)
            pytest.fail(what)
    assert store.agents() == []
    empty = store.save("attention-only", FastWeights(ssm=[], fingerprint="att", batch=1))  # nothing crosses windows
    assert store.load(empty.id).state.batch_size == 1
    zeros = torch.zeros(1, 2, 64, 64)
    shared = FastWeights(ssm=[zeros, zeros], fingerprint="toy-abc")  # one tensor object in two layers
    assert store.load(store.save("shared", shared).id).state.digest() == shared.digest()


def test_values_the_database_could_not_hold_are_refused_the_same_everywhere(store: SnapshotStore) -> None:
    st = toy_state(1)
    keep = store.save("a", st, [1])
    bad_calls = [
        lambda: store.save("a", st, passes=2**31),
        lambda: store.save("a", st, tokens_consolidated=2**63),
        lambda: store.save("a", st, tokens_consolidated=2**70),
        lambda: store.save("a", st, [-1]),
        lambda: store.save("a", st, list(range(9)), max_window=8),
        lambda: store.save("a", st, max_window=-1),
        lambda: store.save("a", st, metadata={"x": math.nan}),
        lambda: store.save("a", st, metadata={"x": math.inf}),
        lambda: store.save("a", st, metadata={"x": "\ud800"}),
        lambda: store.save("a", st, metadata={"\udc00": 1}),
        lambda: store.save("a", st, metadata=[1, 2]),  # type: ignore[arg-type]
        lambda: store.save("a", st, metadata={"x": "y" * (1 << 20)}),
        lambda: store.save("a", st, thread_id="\ud800"),
        lambda: store.save("a\ud800", st),
        lambda: store.save("a", st, expect_current=5),  # type: ignore[arg-type]
        lambda: store.save("a", st, new_agent="yes"),  # type: ignore[arg-type]
        lambda: store.prune("a", keep=2**64),
        lambda: store.gc_blobs(grace_s=math.nan),
        lambda: store.get(5),  # type: ignore[arg-type]
    ]
    for call in bad_calls:
        with pytest.raises(InvalidInput):
            call()
    for weird in ["\ud800", "x" * 33, "a\x00b", ""]:
        for call in (store.get, store.load, store.lineage, store.export_snapshot):
            with pytest.raises(UnknownSnapshot):
                call(weird)
        with pytest.raises(UnknownSnapshot):
            store.save("a", st, parent_id=weird)
    assert [r.id for r in store.history("a")] == [keep.id]


def test_window_limits(store: SnapshotStore) -> None:
    st = toy_state(1)
    assert store.save("a", st, list(range(8)), max_window=8).window_len == 8
    with pytest.raises(InvalidInput, match="max_window"):
        store.save("a", st, list(range(9)), max_window=8)
    with pytest.raises(InvalidInput, match="MAX_WINDOW_TOKENS"):
        store.save("a", st, [1] * (MAX_WINDOW_TOKENS + 1))


def test_new_agent_creates_exactly_once(store: SnapshotStore) -> None:
    store.save("a", toy_state(1), new_agent=True)
    with pytest.raises(InvalidInput, match="already exists"):
        store.save("a", toy_state(2), new_agent=True)
    assert len(store.history("a")) == 1


# ---------------------------------------------------------------------------------------------- SQLite files


def test_sqlite_files_that_are_not_stores(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(StoreError, match="empty"):
        SnapshotStore(f"sqlite:///{empty}")
    assert empty.stat().st_size == 0  # not silently made a store
    text_file = tmp_path / "notes.db"
    text_file.write_text("not a database\n" * 100)
    with pytest.raises(StoreError, match="not a database"):
        SnapshotStore(f"sqlite:///{text_file}")
    good = tmp_path / "good.db"
    with SnapshotStore(f"sqlite:///{good}") as s:
        s.save("a", toy_state(1))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError):
        with SnapshotStore(f"sqlite:///{truncated}") as s:
            s.latest("a")
    with pytest.raises(StoreError, match="directory"):
        SnapshotStore(f"sqlite:///{tmp_path}")


def test_no_silent_mkdir_and_create_false(tmp_path: Path) -> None:
    nested = tmp_path / "no" / "such" / "dir" / "s.db"
    with pytest.raises(StoreError, match="does not exist"):
        SnapshotStore(f"sqlite:///{nested}")
    assert not (tmp_path / "no").exists()
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreError, match="no snapshot store"):
        SnapshotStore(f"sqlite:///{missing}", create=False)
    assert not missing.exists()
    with SnapshotStore(f"sqlite:///{missing}") as s:  # create=True (the default) makes it
        s.save("a", toy_state(1))
    with SnapshotStore(f"sqlite:///{missing}", create=False) as s:
        assert [a.id for a in s.agents()] == ["a"]
    # blob_dir: created (one level, never its parents) only when the store may create
    with pytest.raises(StoreError, match="parent"):
        SnapshotStore(f"sqlite:///{missing}", blob_dir=str(tmp_path / "x" / "blobs"))
    with pytest.raises(StoreError, match="does not exist"):
        SnapshotStore(f"sqlite:///{missing}", blob_dir=str(tmp_path / "blobs"), create=False)
    with SnapshotStore(f"sqlite:///{missing}", blob_dir=str(tmp_path / "blobs")):
        assert (tmp_path / "blobs").is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidInput, match="not a directory"):
        SnapshotStore(f"sqlite:///{missing}", blob_dir=str(tmp_path / "afile"))
    with pytest.raises(StoreError, match="does not exist"):  # a file where the directory should be
        SnapshotStore(f"sqlite:///{tmp_path / 'afile' / 's.db'}")


@pytest.mark.postgres
def test_create_false_on_an_empty_postgres_schema(postgres_schema_url: str) -> None:
    with pytest.raises(StoreError, match="no agentsleep snapshot store"):
        SnapshotStore(postgres_schema_url, create=False)
    with SnapshotStore(postgres_schema_url):
        pass
    with SnapshotStore(postgres_schema_url, create=False) as s:
        assert s.agents() == []
