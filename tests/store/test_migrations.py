"""Alembic: the migrations build exactly the models' schema, upgrade step by step with data, and open concurrently."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from agentsleep.errors import StoreError
from agentsleep.store import Base, SnapshotStore
from agentsleep.store import payload as container
from agentsleep.store.engine import (
    alembic_config,
    current_revision,
    head_revision,
    include_name,
    make_engine,
    upgrade,
    writer,
)

from .helpers import toy_state


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as c:
            opts = {"compare_type": True, "include_name": include_name}
            return compare_metadata(MigrationContext.configure(c, opts=opts), Base.metadata)
    finally:
        engine.dispose()


def _upgrade_to(url: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine, revision)
    finally:
        engine.dispose()


def test_upgrade_from_base_step_by_step_matches_models(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        assert current_revision(engine) is None
        assert inspect(engine).get_table_names() == []
        upgrade(engine, "0001")
        assert current_revision(engine) == "0001"
        assert {"agents", "snapshots"} <= set(inspect(engine).get_table_names())
        assert "sleep_jobs" not in inspect(engine).get_table_names()
        upgrade(engine, "0002")
        assert "sleep_jobs" in inspect(engine).get_table_names()
        upgrade(engine, "head")
        assert current_revision(engine) == head_revision() == "0004"
        tables = set(inspect(engine).get_table_names())
        assert "sleep_jobs" not in tables  # 0004: sleep jobs live in procrastinate's tables (Postgres only)
        assert ("procrastinate_jobs" in tables) == (engine.dialect.name == "postgresql")
    finally:
        engine.dispose()
    assert _diff(store_url) == []  # the migrations and the models describe the same schema


def test_downgrade_to_base_and_back(store_url: str) -> None:
    _upgrade_to(store_url, "head")
    engine = make_engine(store_url)
    try:
        with writer(engine).begin() as c:
            command.downgrade(alembic_config(c), "base")
        assert [t for t in inspect(engine).get_table_names() if t != "alembic_version"] == []
    finally:
        engine.dispose()
    _upgrade_to(store_url, "head")
    assert _diff(store_url) == []


def test_data_written_at_0001_survives_upgrade(store_url: str) -> None:
    """A store created by the first release (revision 0001) opens, upgrades and loads with the current code."""
    _upgrade_to(store_url, "0001")
    st = toy_state(3)
    payload = container.encode(container.canonical(st.to_bytes()), [1, 2], fingerprint=st.fingerprint)
    now = datetime.now(UTC)
    engine = make_engine(store_url)
    try:
        with writer(engine).begin() as c:
            c.execute(
                text(
                    "INSERT INTO agents (id, created_at, fingerprint, state_shapes, last_seq) "
                    "VALUES ('old', :now, 'toy-abc', :shapes, 1)"
                ),
                {"now": now, "shapes": '{"ssm.0": [1, 2, 64, 64], "ssm.1": [1, 2, 64, 64]}'},
            )
            c.execute(
                text(
                    "INSERT INTO snapshots (id, agent_id, seq, created_at, reason, passes, tokens_consolidated, "
                    "window_len, fingerprint, byte_size, sha256, format_version, payload) VALUES "
                    "('s1', 'old', 1, :now, 'sleep', 1, 0, 2, 'toy-abc', :n, :sha, 1, :p)"
                ),
                {"now": now, "n": len(payload), "sha": hashlib.sha256(payload).hexdigest(), "p": payload},
            )
            c.execute(text("UPDATE agents SET current_snapshot_id = 's1' WHERE id = 'old'"))
    finally:
        engine.dispose()
    with SnapshotStore(store_url) as s:  # upgrades to head on open
        got = s.latest("old")
        assert got.state.digest() == st.digest() and got.window == [1, 2]
        assert got.record.record_sha256 is not None  # 0003 sealed the old row
        assert s.save("old", toy_state(4)).seq == 2
        if s.dialect == "postgresql":
            assert s.enqueue_sleep("old").status == "todo"  # 0004 installed the queue
    assert _diff(store_url) == []


def test_schema_newer_than_code_is_refused(store_url: str) -> None:
    _upgrade_to(store_url, "head")
    engine = make_engine(store_url)
    try:
        with engine.begin() as c:
            c.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    with pytest.raises(StoreError, match="9999"):
        SnapshotStore(store_url)


def test_many_openers_migrate_once(store_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_and_save(i: int) -> None:
        try:
            barrier.wait()
            with SnapshotStore(store_url) as s:
                s.save(f"opener-{i}", toy_state(i))
        except BaseException as e:  # collected and re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=open_and_save, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with SnapshotStore(store_url) as s:
        assert len(s.agents()) == 4
    assert _diff(store_url) == []


def test_unreachable_database_is_a_store_error() -> None:
    with pytest.raises(StoreError):
        SnapshotStore("postgresql+psycopg://nobody:wrong@127.0.0.1:1/none")
