"""SnapshotStore behaviour: save/load round trips, lineage, fork, rewind, prune, delete, export/import, files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select, text

from agentsleep.errors import InvalidInput, SnapshotCorrupt, StoreError, UnknownAgent, UnknownSnapshot
from agentsleep.model.state import FastWeights
from agentsleep.store import LoadedSnapshot, Snapshot, SnapshotRecord, SnapshotStore

from .helpers import TOY_FP, toy_state


def test_save_then_load_round_trips_state_and_window(store: SnapshotStore) -> None:
    st = toy_state(1)
    rec = store.save("alice", st, [5, 6, 7], passes=4, tokens_consolidated=1234, thread_id="t1", metadata={"k": [1]})
    got = store.load(rec.id)
    assert isinstance(got, LoadedSnapshot)
    assert got.state.digest() == st.digest()
    assert torch.equal(got.state.ssm[1], st.ssm[1])
    assert got.state.fingerprint == TOY_FP
    assert got.window == [5, 6, 7]
    assert got.record == rec
    assert (rec.agent_id, rec.seq, rec.passes, rec.tokens_consolidated, rec.window_len) == ("alice", 1, 4, 1234, 3)
    assert (rec.reason, rec.thread_id, rec.meta, rec.storage) == ("sleep", "t1", {"k": [1]}, "inline")
    assert rec.parent_id is None and rec.fingerprint == TOY_FP and len(rec.sha256) == 64
    assert rec.created_at.tzinfo is not None and abs((datetime.now(UTC) - rec.created_at).total_seconds()) < 60


def test_empty_window_and_numpy_or_tensor_windows(store: SnapshotStore) -> None:
    st = toy_state(2)
    assert store.load(store.save("a", st, []).id).window == []
    assert store.load(store.save("a", st, np.array([3, 2, 1])).id).window == [3, 2, 1]
    assert store.load(store.save("a", st, torch.tensor([9, 8])).id).window == [9, 8]
    big = list(range(0, 200_000, 7))
    assert store.load(store.save("a", st, big).id).window == big


def test_sequence_numbers_parents_and_current_pointer(store: SnapshotStore) -> None:
    recs = [store.save("bob", toy_state(i), [i]) for i in range(4)]
    assert [r.seq for r in recs] == [1, 2, 3, 4]
    assert [r.parent_id for r in recs] == [None, recs[0].id, recs[1].id, recs[2].id]
    assert store.agent("bob").current_snapshot_id == recs[-1].id
    assert store.latest("bob").state.digest() == toy_state(3).digest()
    assert [r.id for r in store.history("bob")] == [r.id for r in recs]
    assert [r.id for r in store.lineage(recs[-1].id)] == [r.id for r in recs]


def test_state_with_sliding_window_kv_round_trips(store: SnapshotStore) -> None:
    g = torch.Generator().manual_seed(3)
    st = FastWeights(
        ssm=[torch.randn(1, 2, 64, 64, generator=g)],
        kv=[(torch.randn(1, 1, 5, 32, generator=g), torch.randn(1, 1, 5, 32, generator=g))],
        kv_valid=torch.ones(1, 5),
        fingerprint="swa",
    )
    got = store.load(store.save("swa-agent", st, [1]).id).state
    assert got.digest() == st.digest() and got.kv_valid is not None and len(got.kv) == 1


def test_agents_listing(store: SnapshotStore) -> None:
    assert store.agents() == []
    store.save("b", toy_state(1))
    store.save("a", toy_state(2))
    store.save("a", toy_state(3))
    listing = store.agents()
    assert [(a.id, a.n_snapshots, a.current_seq, a.last_seq) for a in listing] == [("a", 2, 2, 2), ("b", 1, 1, 1)]
    assert listing[0].state_shapes == {"ssm.0": [1, 2, 64, 64], "ssm.1": [1, 2, 64, 64]}
    assert store.agent("b").fingerprint == TOY_FP


def test_explicit_parent_and_rewind(store: SnapshotStore) -> None:
    r1, _, r3 = (store.save("c", toy_state(i)) for i in range(3))
    store.set_current("c", r1.id)
    assert store.latest("c").record.id == r1.id
    r4 = store.save("c", toy_state(4))  # branches off the rewound snapshot
    assert r4.parent_id == r1.id and r4.seq == 4
    assert [r.id for r in store.lineage(r4.id)] == [r1.id, r4.id]
    r5 = store.save("c", toy_state(5), parent_id=r3.id)
    assert r5.parent_id == r3.id
    other = store.save("other", toy_state(6))
    with pytest.raises(InvalidInput):
        store.set_current("c", other.id)
    with pytest.raises(UnknownSnapshot):
        store.set_current("c", "nope")
    with pytest.raises(UnknownSnapshot):
        store.save("c", toy_state(7), parent_id="nope")
    assert store.agent("c").current_snapshot_id == r5.id


def test_fork_copies_state_and_links_lineage(store: SnapshotStore) -> None:
    store.save("src", toy_state(1), [1])
    r2 = store.save("src", toy_state(2), [1, 2], passes=3, tokens_consolidated=99)
    f = store.fork(r2.id, "dst")
    assert (f.agent_id, f.seq, f.parent_id, f.reason, f.passes, f.tokens_consolidated) == (
        "dst",
        1,
        r2.id,
        "fork",
        3,
        99,
    )
    got = store.latest("dst")
    assert got.state.digest() == toy_state(2).digest() and got.window == [1, 2]
    # independent afterwards: saving to the fork leaves the source untouched
    store.save("dst", toy_state(9))
    assert store.latest("src").record.id == r2.id
    assert [r.agent_id for r in store.lineage(store.latest("dst").record.id)] == ["src", "src", "dst", "dst"]
    with pytest.raises(InvalidInput, match="already exists"):
        store.fork(r2.id, "src")
    with pytest.raises(UnknownSnapshot):
        store.fork("nope", "x")
    assert "x" not in {a.id for a in store.agents()}


def test_prune_keeps_newest_and_current_and_nulls_parents(store: SnapshotStore) -> None:
    recs = [store.save("p", toy_state(i)) for i in range(6)]
    store.set_current("p", recs[1].id)  # a rewound agent: its current snapshot is old
    assert [r.id for r in store.prune_candidates("p", keep=2)] == [recs[0].id, recs[2].id, recs[3].id]
    assert store.prune("p", keep=2) == 3
    left = store.history("p")
    assert [r.seq for r in left] == [2, 5, 6]
    assert left[0].parent_id is None  # its parent (seq 1) was pruned
    assert left[1].parent_id is None and left[2].parent_id == recs[4].id
    for r in left:  # survivors still load
        store.load(r.id)
    assert store.prune("p", keep=0) == 2  # only the current one remains
    assert [r.id for r in store.history("p")] == [recs[1].id]
    assert store.prune("p", keep=0) == 0
    assert store.save("p", toy_state(7)).seq == 7  # numbers never repeat
    with pytest.raises(InvalidInput):
        store.prune("p", keep=-1)
    with pytest.raises(UnknownAgent):
        store.prune("ghost", keep=1)


def test_delete_agent_keeps_forks_alive(store: SnapshotStore) -> None:
    r = store.save("doomed", toy_state(1))
    store.save("doomed", toy_state(2))
    if store.dialect == "postgresql":
        store.enqueue_sleep("doomed")
    f = store.fork(r.id, "child")
    assert store.delete_agent("doomed") == 2
    with pytest.raises(UnknownAgent):
        store.history("doomed")
    with pytest.raises(UnknownSnapshot):
        store.load(r.id)
    assert store.sleep_jobs("doomed") == []
    child = store.latest("child")
    assert child.record.id == f.id and child.record.parent_id is None
    assert child.state.digest() == toy_state(1).digest()
    with pytest.raises(UnknownAgent):
        store.delete_agent("doomed")


def test_export_import_round_trip_within_and_across_stores(store: SnapshotStore, tmp_path: Path) -> None:
    r = store.save("exp", toy_state(5), [4, 4, 4], passes=2, tokens_consolidated=50, thread_id="th")
    data = store.export_snapshot(r.id)
    # same store, new agent: parent links to the original
    imp = store.import_snapshot(data, agent_id="imp")
    assert (imp.agent_id, imp.seq, imp.reason, imp.parent_id, imp.passes, imp.tokens_consolidated) == (
        "imp",
        1,
        "import",
        r.id,
        2,
        50,
    )
    assert imp.meta["imported_from"]["id"] == r.id and imp.thread_id == "th"
    got = store.latest("imp")
    assert got.state.digest() == toy_state(5).digest() and got.window == [4, 4, 4]
    # default target: the exporting agent's id, appended to its history
    again = store.import_snapshot(data)
    assert (again.agent_id, again.seq) == ("exp", 2)
    # another store (always SQLite): the original is unknown there, so no parent
    with SnapshotStore(f"sqlite:///{tmp_path / 'other.db'}") as other:
        rec = other.import_snapshot(data)
        assert (rec.agent_id, rec.parent_id) == ("exp", None)
        assert other.latest("exp").state.digest() == toy_state(5).digest()


def test_reopen_sees_everything(store_url: str) -> None:
    with SnapshotStore(store_url) as s1:
        r = s1.save("persist", toy_state(11), [1, 2])
    with SnapshotStore(store_url) as s2:
        got = s2.latest("persist")
        assert got.record.id == r.id and got.state.digest() == toy_state(11).digest()


def test_invalid_arguments(store: SnapshotStore) -> None:
    st = toy_state(1)
    bad_calls = [
        lambda: store.save("", st),
        lambda: store.save("x" * 129, st),
        lambda: store.save(123, st),  # type: ignore[arg-type]
        lambda: store.save("a", "not a state"),  # type: ignore[arg-type]
        lambda: store.save("a", FastWeights(ssm=st.ssm, fingerprint="")),
        lambda: store.save("a", st, [1.5]),
        lambda: store.save("a", st, [True]),
        lambda: store.save("a", st, "abc"),  # type: ignore[arg-type]
        lambda: store.save("a", st, [2**63]),
        lambda: store.save("a", st, reason="Not Valid"),
        lambda: store.save("a", st, passes=0),
        lambda: store.save("a", st, tokens_consolidated=-1),
        lambda: store.save("a", st, metadata={"x": object()}),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidInput):
            call()
    assert store.agents() == []  # nothing half-written


def test_records_are_immutable_and_serialisable(store: SnapshotStore) -> None:
    rec = store.save("imm", toy_state(1))
    with pytest.raises(AttributeError):
        rec.seq = 5  # type: ignore[misc]
    d = rec.to_dict()
    assert d["id"] == rec.id and isinstance(d["created_at"], str)
    assert isinstance(store.get(rec.id), SnapshotRecord)


def test_repr_has_no_payload(store: SnapshotStore) -> None:
    rec = store.save("repr", toy_state(1))
    from sqlalchemy.orm import Session, undefer

    with Session(store.engine) as s:
        snap = s.get(Snapshot, rec.id, options=[undefer(Snapshot.payload)])
        assert snap is not None and snap.payload is not None
        r = repr(snap)
    assert rec.id in r and "repr" in r and TOY_FP in r and len(r) < 200
    assert "SnapshotStore(" in repr(store)


def test_sqlite_durability_pragmas(tmp_path: Path) -> None:
    with SnapshotStore(f"sqlite:///{tmp_path / 'p.db'}") as s, s.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert c.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    with SnapshotStore(f"sqlite:///{tmp_path / 'p.db'}", sqlite_synchronous="NORMAL") as s, s.engine.connect() as c:
        assert c.execute(text("PRAGMA synchronous")).scalar() == 1


def test_in_memory_sqlite_works() -> None:
    with SnapshotStore("sqlite://") as s:
        r = s.save("m", toy_state(1))
        assert s.load(r.id).state.digest() == toy_state(1).digest()


def test_bad_urls() -> None:
    with pytest.raises(InvalidInput):
        SnapshotStore("mysql://u@h/db")
    with pytest.raises(InvalidInput):
        SnapshotStore("::not a url::")


# ---------------------------------------------------------------- content-addressed payload files


@pytest.fixture
def file_store(store_url: str, tmp_path: Path) -> Iterator[SnapshotStore]:
    # inline_limit=0: every payload goes to a file
    s = SnapshotStore(store_url, blob_dir=str(tmp_path / "blobs"), inline_limit=0)
    try:
        yield s
    finally:
        s.close()


def _blob_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.snap"))


def test_file_payloads_round_trip_and_share_content(file_store: SnapshotStore, tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    r = file_store.save("f", toy_state(1), [1])
    assert r.storage == "file"
    assert file_store.load(r.id).state.digest() == toy_state(1).digest()
    with file_store.engine.connect() as c:
        assert c.execute(select(Snapshot.payload).where(Snapshot.id == r.id)).scalar() is None
    assert len(_blob_files(root)) == 1
    # an identical payload (same state, same window) shares the file
    file_store.save("g", toy_state(1), [1])
    assert len(_blob_files(root)) == 1
    file_store.save("f", toy_state(2), [1])
    assert len(_blob_files(root)) == 2
    # pruning f's first snapshot must not remove the file g still uses
    assert file_store.prune("f", keep=1) == 1
    assert len(_blob_files(root)) == 2
    assert file_store.latest("g").state.digest() == toy_state(1).digest()
    file_store.delete_agent("g")
    assert len(_blob_files(root)) == 1
    # a store opened without blob_dir cannot read file payloads and says why
    with SnapshotStore(file_store.engine.url.render_as_string(hide_password=False)) as bare:
        with pytest.raises(StoreError, match="blob_dir"):
            bare.latest("f")


def test_inline_limit_splits_small_and_large(store_url: str, tmp_path: Path) -> None:
    with SnapshotStore(store_url, blob_dir=str(tmp_path / "b"), inline_limit=100_000) as s:
        small = s.save("s", toy_state(1))
        large = s.save("l", toy_state(1, dim=128))
        assert (small.storage, large.storage) == ("inline", "file")
        assert s.load(large.id).state.digest() == toy_state(1, dim=128).digest()


def test_missing_or_damaged_file_is_corrupt(file_store: SnapshotStore, tmp_path: Path) -> None:
    r1 = file_store.save("h", toy_state(1))
    r2 = file_store.save("h", toy_state(2))
    (path,) = [p for p in _blob_files(tmp_path / "blobs") if r2.sha256 in p.name]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt, match="sha256"):
        file_store.latest("h")
    path.unlink()
    with pytest.raises(SnapshotCorrupt, match="missing"):
        file_store.load(r2.id)
    assert file_store.load(r1.id).state.digest() == toy_state(1).digest()
    assert file_store.latest("h", fallback=True).record.id == r1.id


def test_gc_removes_only_old_unreferenced_files(file_store: SnapshotStore, tmp_path: Path) -> None:
    r = file_store.save("k", toy_state(1))
    root = tmp_path / "blobs"
    orphan = root / "ab" / ("ab" + "0" * 62 + ".snap")  # what a writer killed before its commit leaves
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x")
    assert file_store.gc_blobs(grace_s=3600) == 0  # too young: might be a save in flight
    old = 1_000_000_000
    for p in _blob_files(root):
        os.utime(p, (old, old))
    assert file_store.gc_blobs(grace_s=3600) == 1
    assert not orphan.exists()
    assert file_store.load(r.id).record.id == r.id
