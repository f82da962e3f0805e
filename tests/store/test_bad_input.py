"""Bad input: each case raises a typed error and loses nothing (pointer, history and other snapshots unchanged)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as st_save
from sqlalchemy import select, update

from agentsleep.errors import (
    AgentSleepError,
    SnapshotCorrupt,
    SnapshotMismatch,
    UnknownAgent,
    UnknownSnapshot,
)
from agentsleep.store import Snapshot, SnapshotStore
from agentsleep.store import payload as container

from .helpers import toy_state


def _raw_payload(store: SnapshotStore, snapshot_id: str) -> bytes:
    with store.engine.connect() as c:
        data = c.execute(select(Snapshot.payload).where(Snapshot.id == snapshot_id)).scalar_one()
    return bytes(data)


def _set(store: SnapshotStore, snapshot_id: str, **values: object) -> None:
    with store.engine.begin() as c:
        c.execute(update(Snapshot).where(Snapshot.id == snapshot_id).values(**values))


@pytest.fixture
def two_agents(store: SnapshotStore) -> dict[str, list[str]]:
    """Agent "a" with three snapshots (the third is current), agent "b" with one."""
    ids = {"a": [store.save("a", toy_state(i), [i, i]).id for i in range(3)], "b": [store.save("b", toy_state(9)).id]}
    return ids


def _assert_nothing_lost(store: SnapshotStore, ids: dict[str, list[str]], damaged: str | None = None) -> None:
    assert store.agent("a").current_snapshot_id == ids["a"][-1]
    assert [r.id for r in store.history("a")] == ids["a"]
    assert [r.id for r in store.history("b")] == ids["b"]
    for i, sid in enumerate(ids["a"]):
        if sid != damaged:
            assert store.load(sid).state.digest() == toy_state(i).digest()
    assert store.latest("b").state.digest() == toy_state(9).digest()


def _truncate(data: bytes) -> bytes:
    return data[: len(data) - 1000]


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x01  # one bit in the tensor data
    return bytes(b)


def _flip_header(data: bytes) -> bytes:
    b = bytearray(data)
    b[20] ^= 0x40
    return bytes(b)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: {"payload": _truncate(d)}, id="truncated"),
        pytest.param(lambda d: {"payload": _flip(d)}, id="flipped-data-bit"),
        pytest.param(lambda d: {"payload": _flip_header(d)}, id="flipped-header"),
        pytest.param(lambda d: {"payload": b""}, id="emptied"),
        pytest.param(lambda d: {"sha256": "0" * 64}, id="wrong-sha256"),
        pytest.param(lambda d: {"byte_size": len(d) + 1}, id="wrong-size"),
    ],
)
def test_damaged_current_snapshot_raises_corrupt_and_loses_nothing(
    store: SnapshotStore, two_agents: dict[str, list[str]], damage: Callable[[bytes], dict[str, object]]
) -> None:
    victim = two_agents["a"][-1]
    _set(store, victim, **damage(_raw_payload(store, victim)))
    with pytest.raises(SnapshotCorrupt):
        store.load(victim)
    with pytest.raises(SnapshotCorrupt):
        store.latest("a")
    with pytest.raises(SnapshotCorrupt):
        store.fork(victim, "fork-of-corrupt")
    with pytest.raises(SnapshotCorrupt):
        store.export_snapshot(victim)
    assert "fork-of-corrupt" not in {a.id for a in store.agents()}
    _assert_nothing_lost(store, two_agents, damaged=victim)
    # the runtime's way out: fall back to the newest older snapshot that verifies, without moving the pointer
    ok = store.latest("a", fallback=True)
    assert ok.record.id == two_agents["a"][1] and ok.state.digest() == toy_state(1).digest()
    assert store.agent("a").current_snapshot_id == victim
    # and saving again continues from the (damaged) current one's lineage, with a fresh sequence number
    rec = store.save("a", toy_state(5))
    assert rec.seq == 4 and store.latest("a").state.digest() == toy_state(5).digest()


def test_another_agents_payload_in_the_row_is_detected(store: SnapshotStore, two_agents: dict[str, list[str]]) -> None:
    # a row carrying a well-formed payload of someone else (e.g. a botched manual repair) fails the sha256 check
    _set(store, two_agents["a"][0], payload=_raw_payload(store, two_agents["b"][0]))
    with pytest.raises(SnapshotCorrupt):
        store.load(two_agents["a"][0])
    _assert_nothing_lost(store, two_agents, damaged=two_agents["a"][0])


def test_consistent_tampering_is_caught_by_the_inner_checksum(
    store: SnapshotStore, two_agents: dict[str, list[str]]
) -> None:
    # flip a data bit and fix up the row's sha256 and size: the container's content checksum still catches it
    victim = two_agents["a"][1]
    bad = _flip(_raw_payload(store, victim))
    _set(store, victim, payload=bad, sha256=hashlib.sha256(bad).hexdigest())
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        store.load(victim)
    _assert_nothing_lost(store, two_agents, damaged=victim)


def test_fallback_with_nothing_good_raises(store: SnapshotStore) -> None:
    r = store.save("lonely", toy_state(1))
    _set(store, r.id, sha256="f" * 64)
    with pytest.raises(SnapshotCorrupt):
        store.latest("lonely", fallback=True)


def test_other_fingerprint_or_shapes_are_mismatches(store: SnapshotStore, two_agents: dict[str, list[str]]) -> None:
    with pytest.raises(SnapshotMismatch, match="toy-abc"):
        store.save("a", toy_state(1, fingerprint="other-model"))
    with pytest.raises(SnapshotMismatch, match="shapes"):
        store.save("a", toy_state(1, heads=4))
    with pytest.raises(SnapshotMismatch, match="shapes"):
        store.save("a", toy_state(1, layers=3))
    sid = two_agents["a"][0]
    with pytest.raises(SnapshotMismatch):
        store.load(sid, fingerprint="other-model")
    with pytest.raises(SnapshotMismatch):
        store.load(sid, shapes={"ssm.0": [1, 2, 32, 32], "ssm.1": [1, 2, 32, 32]})
    with pytest.raises(SnapshotMismatch):
        store.latest("a", fingerprint="other-model")
    assert store.load(sid, fingerprint="toy-abc", shapes=toy_state(0).shapes()).record.id == sid
    # importing a snapshot of another model into an existing agent
    with SnapshotStore("sqlite://") as other:
        foreign = other.export_snapshot(other.save("a", toy_state(3, fingerprint="other-model")).id)
    with pytest.raises(SnapshotMismatch):
        store.import_snapshot(foreign)
    _assert_nothing_lost(store, two_agents)


def test_unknown_ids(store: SnapshotStore, two_agents: dict[str, list[str]]) -> None:
    cases: list[tuple[type[AgentSleepError], Callable[[], object]]] = [
        (UnknownSnapshot, lambda: store.load("nope")),
        (UnknownSnapshot, lambda: store.get("nope")),
        (UnknownSnapshot, lambda: store.lineage("nope")),
        (UnknownSnapshot, lambda: store.export_snapshot("nope")),
        (UnknownSnapshot, lambda: store.fork("nope", "new")),
        (UnknownAgent, lambda: store.latest("ghost")),
        (UnknownAgent, lambda: store.history("ghost")),
        (UnknownAgent, lambda: store.agent("ghost")),
        (UnknownAgent, lambda: store.prune("ghost", keep=1)),
        (UnknownAgent, lambda: store.delete_agent("ghost")),
        (UnknownAgent, lambda: store.set_current("ghost", two_agents["a"][0])),
    ]
    if store.dialect == "postgresql":
        cases.append((UnknownAgent, lambda: store.enqueue_sleep("ghost")))
    for exc, call in cases:
        with pytest.raises(exc):
            call()
    # the builtin bases still work for generic handlers, and messages name the id
    with pytest.raises(KeyError, match="ghost"):
        store.latest("ghost")
    assert "ghost" not in {a.id for a in store.agents()}
    _assert_nothing_lost(store, two_agents)


def _foreign_safetensors() -> bytes:
    return st_save({"weight": np.ones((2, 2), dtype=np.float32)}, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda good: b"", id="empty"),
        pytest.param(lambda good: b"hello, I am a text file\n", id="text"),
        pytest.param(lambda good: bytes(range(256)) * 40, id="random-bytes"),
        pytest.param(lambda good: b'{"agent": "a"}', id="json"),
        pytest.param(lambda good: _foreign_safetensors(), id="other-safetensors"),
        pytest.param(lambda good: toy_state(1).to_bytes(), id="bare-fastweights"),
        pytest.param(lambda good: good[: len(good) // 2], id="truncated-export"),
        pytest.param(lambda good: _flip(good), id="flipped-export"),
        pytest.param(lambda good: good[:8] + b"\xff" * 32 + good[40:], id="garbled-header"),
    ],
)
def test_import_of_non_snapshot_is_corrupt(
    store: SnapshotStore, two_agents: dict[str, list[str]], make: Callable[[bytes], bytes]
) -> None:
    good = store.export_snapshot(two_agents["a"][0])
    with pytest.raises(SnapshotCorrupt):
        store.import_snapshot(make(good), agent_id="a")
    with pytest.raises(SnapshotCorrupt):
        store.import_snapshot(make(good), agent_id="brand-new")
    assert "brand-new" not in {a.id for a in store.agents()}
    _assert_nothing_lost(store, two_agents)


def test_import_of_newer_container_version_is_mismatch(store: SnapshotStore) -> None:
    good = toy_state(1)
    data = container.encode(container.canonical(good.to_bytes()), [1], fingerprint="toy-abc")
    newer = data.replace(b'"format_version":"1"', b'"format_version":"9"')
    assert newer != data
    with pytest.raises(SnapshotMismatch, match="newer"):
        store.import_snapshot(newer, agent_id="z")


def test_file_import_from_disk_round_trip(store: SnapshotStore, tmp_path: Path) -> None:
    r = store.save("disk", toy_state(4), [7])
    f = tmp_path / "snap.safetensors"
    f.write_bytes(store.export_snapshot(r.id))
    rec = store.import_snapshot(f.read_bytes(), agent_id="disk2")
    assert store.load(rec.id).state.digest() == toy_state(4).digest()
