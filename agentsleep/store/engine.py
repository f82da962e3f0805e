"""Engines for SQLite and Postgres with the store's durability and locking settings, and migrations on open.

SQLite: WAL journal (readers never block the writer), ``synchronous=FULL`` by default (a commit survives power loss,
not only a process kill; NORMAL is faster and still safe against process crashes), foreign keys on, a busy timeout,
and write transactions that start with ``BEGIN IMMEDIATE`` so two writers queue on the busy timeout instead of
failing with "database is locked" when both try to upgrade a read lock (WAL's SQLITE_BUSY_SNAPSHOT).

Postgres (psycopg 3): writers lock the agent row (``SELECT ... FOR UPDATE``); migrations hold an advisory lock so
many hosts can open the same database at once.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.pool import StaticPool

from agentsleep.errors import InvalidInput, StoreError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x61676E74736C7031  # arbitrary constant: pg_advisory_xact_lock key for "agntslp1"
_WRITE_OPTION = "agentsleep_write"  # execution option marking a connection whose transactions write

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


def normalise_url(url: str | URL) -> URL:
    """Parse a database URL; bare ``postgresql://`` / ``postgres://`` get the psycopg 3 driver."""
    try:
        u = make_url(url)
    except ArgumentError as e:
        raise InvalidInput(f"not a database URL: {url!r} (e.g. sqlite:///agentsleep.db)") from e
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise InvalidInput(f"unsupported database {u.get_backend_name()!r}: use sqlite:/// or postgresql+psycopg://")
    return u


def make_engine(
    url: str | URL,
    *,
    sqlite_synchronous: Synchronous = "FULL",
    busy_timeout_s: float = 30.0,
    engine_kwargs: dict[str, Any] | None = None,
) -> Engine:
    """Create an engine with the store's settings. Use ``engine.execution_options(agentsleep_write=True)`` for
    connections that write (``BEGIN IMMEDIATE`` on SQLite; no difference on Postgres)."""
    u = normalise_url(url)
    kwargs: dict[str, Any] = dict(engine_kwargs or {})
    if u.get_backend_name() == "sqlite":
        memory = u.database in (None, "", ":memory:")
        if memory:  # one shared connection, or every checkout would see a different empty database
            kwargs.setdefault("poolclass", StaticPool)
        else:
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        kwargs.setdefault("connect_args", {}).setdefault("timeout", busy_timeout_s)
        engine = create_engine(u, **kwargs)
        _sqlite_events(engine, synchronous=sqlite_synchronous, busy_timeout_ms=int(busy_timeout_s * 1000))
    else:
        kwargs.setdefault("pool_pre_ping", True)  # survive a restarted server between calls
        connect_args = kwargs.setdefault("connect_args", {})
        connect_args.setdefault("connect_timeout", max(1, int(busy_timeout_s)))
        engine = create_engine(u, **kwargs)
    return engine


def _sqlite_events(engine: Engine, *, synchronous: Synchronous, busy_timeout_ms: int) -> None:
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise InvalidInput(f"sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver (the SQLAlchemy recipe for pysqlite) so we can BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() not in ("wal", "memory"):
                log.warning("SQLite refused WAL mode (journal_mode=%s); concurrent readers will block writers", mode)
            cur.execute(f"PRAGMA synchronous = {synchronous}")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def writer(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions take the write lock up front on SQLite."""
    return engine.execution_options(**{_WRITE_OPTION: True})


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    """The migration scripts, parsed once per process (every store open checks the head revision)."""
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _scripts().get_current_head()
    if head is None:
        raise StoreError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` under a lock, so concurrent openers migrate exactly once."""
    head = head_revision()
    try:
        current = current_revision(engine)
        if revision == "head" and current == head:
            return
        with writer(engine).begin() as conn:  # BEGIN IMMEDIATE on SQLite: one migrator at a time
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            now = MigrationContext.configure(conn).get_current_revision()
            known = {s.revision for s in _scripts().walk_revisions()}
            if now is not None and now not in known:
                raise StoreError(
                    f"the database schema is at revision {now!r}, which this agentsleep does not know "
                    f"(newest known: {head!r}); upgrade agentsleep"
                )
            log.info("migrating snapshot store %s from %s to %s", engine.url.render_as_string(), now, revision)
            command.upgrade(alembic_config(conn), revision)
    except OperationalError as e:
        raise StoreError(f"could not open the snapshot store at {engine.url.render_as_string()}: {e.orig}") from e


__all__ = ["alembic_config", "current_revision", "head_revision", "make_engine", "normalise_url", "upgrade", "writer"]
