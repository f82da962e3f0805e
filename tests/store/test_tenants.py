"""Tenants in the store: `SnapshotStore(url, tenant=...)` sees its own agents only, on SQLite and Postgres.

Another tenant's agent id or snapshot id must behave exactly like one that exists nowhere: the same error type and
the same message (the id substituted), or the same ``None`` / empty answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command

from agentsleep.errors import InvalidInput, StoreError, UnknownAgent, UnknownSnapshot
from agentsleep.ids import KEY_LEN, TENANT_LEN, TENANT_SEP, agent_key, split_agent_key
from agentsleep.store import SnapshotStore
from agentsleep.store import payload as container
from agentsleep.store.engine import alembic_config, make_engine, writer

from .helpers import toy_state


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[SnapshotStore, SnapshotStore, SnapshotStore]]:
    """(default tenant, tenant "acme", tenant "beta") on one database."""
    root = SnapshotStore(store_url)
    try:
        yield root, root.for_tenant("acme"), SnapshotStore(store_url, tenant="beta")
    finally:
        root.close()


def test_same_agent_id_in_three_tenants_are_three_agents(stores: tuple[SnapshotStore, ...]) -> None:
    root, a, b = stores
    saved = {}
    for i, (who, store) in enumerate([("root", root), ("a", a), ("b", b)] * 2):  # interleaved turns
        saved.setdefault(who, []).append(store.save("bob", toy_state(10 * i), [i, i + 1], reason="manual"))
    for who, store in (("root", root), ("a", a), ("b", b)):
        mine = saved[who]
        assert [r.id for r in store.history("bob")] == [r.id for r in mine]
        assert [r.seq for r in mine] == [1, 2]  # each tenant's agent numbers its own snapshots
        assert {r.agent_id for r in store.history("bob")} == {"bob"}  # the caller's id, never the stored key
        latest = store.latest("bob")
        assert latest.record.id == mine[-1].id and latest.record.agent_id == "bob"
        assert torch_equal(latest.state.ssm[0], store.load(mine[-1].id).state.ssm[0])
        assert [ag.id for ag in store.agents()] == ["bob"]
        assert store.agent("bob").n_snapshots == 2
    assert {r.id for r in saved["a"]}.isdisjoint(r.id for r in saved["b"])


def torch_equal(x: Any, y: Any) -> bool:
    return bool((x == y).all())


def _same_error(call: Callable[[str], Any], foreign: str, absent: str) -> None:
    """``call(foreign)`` fails exactly as ``call(absent)`` does, message included (the id substituted)."""
    with pytest.raises((UnknownAgent, UnknownSnapshot)) as got:
        call(foreign)
    with pytest.raises(type(got.value)) as ref:
        call(absent)
    assert str(got.value).replace(foreign, "<id>") == str(ref.value).replace(absent, "<id>")


def test_another_tenants_ids_are_unknown_everywhere(stores: tuple[SnapshotStore, ...]) -> None:
    root, a, b = stores
    first = a.save("alice", toy_state(1), [1], metadata={"turn_id": "t1"})
    second = a.save("alice", toy_state(2), [2])
    nobody = "0" * 32  # a snapshot id that exists nowhere

    for other in (b, root):
        agent_calls: list[Callable[[str], Any]] = [
            other.latest,
            other.history,
            other.agent,
            lambda x, o=other: o.prune(x, keep=1),
            lambda x, o=other: o.prune_candidates(x, keep=1),
            lambda x, o=other: o.delete_agent(x),
            lambda x, o=other: o.set_current(x, first.id),
        ]
        for call in agent_calls:
            _same_error(call, "alice", "nobody-here")
        assert other.current_id("alice") is None
        assert other.find_by_metadata("alice", "turn_id", "t1") is None
        assert other.agents() == []
        snapshot_calls: list[Callable[[str], Any]] = [
            other.get,
            other.load,
            other.verify,
            other.lineage,
            other.export_snapshot,
            lambda x, o=other: o.fork(x, "stolen"),
            lambda x, o=other: o.save("mine", toy_state(3), [3], parent_id=x),
        ]
        for call in snapshot_calls:
            _same_error(call, second.id, nobody)
    # B's own agent cannot be pointed at A's snapshot either (UnknownSnapshot, not "belongs to another agent").
    b.save("own", toy_state(4), [4])
    _same_error(lambda x: b.set_current("own", x), first.id, nobody)
    # Nothing of A's changed.
    assert [r.id for r in a.history("alice")] == [first.id, second.id]
    assert a.current_id("alice") == second.id


def test_a_save_in_one_tenant_never_touches_another(stores: tuple[SnapshotStore, ...]) -> None:
    _, a, b = stores
    mine = a.save("alice", toy_state(1), [1, 2, 3])
    b.save("alice", toy_state(2), [9], new_agent=True)  # B "creating" A's id creates B's own agent
    b.delete_agent("alice")
    assert a.latest("alice").record.id == mine.id and a.latest("alice").window == [1, 2, 3]


def test_default_tenant_cannot_name_a_tenant_key(stores: tuple[SnapshotStore, ...]) -> None:
    root, a, _ = stores
    a.save("alice", toy_state(1), [1])
    with pytest.raises(InvalidInput, match="control characters"):
        root.latest(agent_key("acme", "alice"))
    with pytest.raises(InvalidInput, match="control characters"):
        a.latest(f"x{TENANT_SEP}alice")


@pytest.mark.parametrize("bad", ["a b", "a/b", "a%", "x" * (TENANT_LEN + 1), "é", 3])
def test_bad_tenant_names_are_refused(store_url: str, bad: Any) -> None:
    with pytest.raises(InvalidInput, match="tenant"):
        SnapshotStore(store_url, tenant=bad)


def test_like_wildcards_in_tenant_names_are_literal(store_url: str) -> None:
    """``_`` is a LIKE wildcard: tenant "a_c" must not see tenant "abc"'s agents."""
    with SnapshotStore(store_url, tenant="abc") as abc:
        abc.save("x", toy_state(1), [1])
        assert abc.for_tenant("a_c").agents() == []
        assert abc.for_tenant("ab").agents() == []  # a prefix of a tenant name is another tenant


def test_longest_agent_id_in_longest_tenant(store_url: str) -> None:
    tenant, agent = "t" * TENANT_LEN, "a" * 128
    assert len(agent_key(tenant, agent)) == KEY_LEN
    assert split_agent_key(agent_key(tenant, agent)) == (tenant, agent)
    with SnapshotStore(store_url, tenant=tenant) as s:
        rec = s.save(agent, toy_state(1), [1])
        assert rec.agent_id == agent and s.latest(agent).record.id == rec.id
        assert [x.id for x in s.agents()] == [agent]


def test_export_from_one_tenant_import_into_another(stores: tuple[SnapshotStore, ...]) -> None:
    _, a, b = stores
    src = a.save("alice", toy_state(1), [5, 6])
    data = a.export_snapshot(src.id)
    record = container.decode(data).record or {}
    assert record["agent_id"] == "alice" and "acme" not in json.dumps(record)  # the file names it as its tenant does
    imported = b.import_snapshot(data)
    assert imported.agent_id == "alice"
    assert imported.parent_id is None  # the origin is A's snapshot: invisible to B, so no lineage link into A
    assert imported.meta["imported_from"]["agent_id"] == "alice"
    assert b.latest("alice").window == [5, 6]
    forked = a.fork(src.id, "alice2")
    assert forked.meta["forked_from"]["agent_id"] == "alice"
    assert [r.id for r in a.lineage(forked.id)] == [src.id, forked.id]


def test_a_shared_payload_file_outlives_one_tenants_delete(store_url: str, tmp_path: Path) -> None:
    """Identical payloads of two tenants share one content-addressed file; deleting one tenant's agent (and pruning)
    never removes the file the other still references."""
    blobs = tmp_path / "blobs"
    with SnapshotStore(store_url, blob_dir=str(blobs), inline_limit=0, tenant="acme") as a:
        b = a.for_tenant("beta")
        ra = a.save("bob", toy_state(7), [1, 2])
        rb = b.save("bob", toy_state(7), [1, 2])
        assert ra.sha256 == rb.sha256
        files = [p for p in blobs.rglob("*") if p.is_file()]
        assert len(files) == 1
        a.delete_agent("bob")
        assert files[0].exists() and b.verify(rb.id).id == rb.id
        assert a.gc_blobs(grace_s=0) == 0 and b.latest("bob").window == [1, 2]
        b.delete_agent("bob")
        assert not files[0].exists()


@pytest.mark.postgres
def test_sleep_jobs_are_per_tenant(postgres_schema_url: str) -> None:
    with SnapshotStore(postgres_schema_url, tenant="acme") as a:
        b, root = a.for_tenant("beta"), a.for_tenant("")
        for s in (a, b, root):
            s.save("bob", toy_state(1), [1])
        ja, jb = a.enqueue_sleep("bob"), b.enqueue_sleep("bob", passes=2)
        assert ja.id != jb.id  # one waiting sleep per agent: two tenants' "bob" are two agents
        assert [(j.id, j.agent_id) for j in a.sleep_jobs()] == [(ja.id, "bob")]
        assert [(j.id, j.agent_id, j.passes) for j in b.sleep_jobs("bob")] == [(jb.id, "bob", 2)]
        assert root.sleep_jobs() == [] and root.sleep_jobs("bob") == []
        a.delete_agent("bob")
        assert a.sleep_jobs() == [] and [j.id for j in b.sleep_jobs()] == [jb.id]


def test_downgrade_below_tenants_is_refused_while_tenants_hold_agents(store_url: str) -> None:
    with SnapshotStore(store_url, tenant="acme") as a:
        a.save("bob", toy_state(1), [1])
    engine = make_engine(store_url)
    try:
        with pytest.raises(StoreError, match="belong to tenants"), writer(engine).begin() as c:
            command.downgrade(alembic_config(c), "0004")
    finally:
        engine.dispose()
    with SnapshotStore(store_url, tenant="acme") as a:  # nothing was changed by the refused downgrade
        assert a.latest("bob").window == [1]
        a.delete_agent("bob")
    engine = make_engine(store_url)
    try:
        with writer(engine).begin() as c:
            command.downgrade(alembic_config(c), "0004")
            command.upgrade(alembic_config(c), "head")
    finally:
        engine.dispose()
