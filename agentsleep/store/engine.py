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
import time
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import StaticPool

from agentsleep.errors import InvalidInput, StoreError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x61676E74736C7031  # arbitrary constant: pg_advisory_xact_lock key for "agntslp1"
_WRITE_OPTION = "agentsleep_write"  # execution option marking a connection whose transactions write
_EMPTY_FILE_WAIT_S = 2.0  # how long a 0-byte SQLite file may take to get its header from a concurrent creator

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


def one_line(message: object) -> str:
    """A driver's message on one line (psycopg's span several, with tabs): errors are printed as one line."""
    return " ".join(str(message).split())


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
    create: bool = True,
) -> Engine:
    """Create an engine with the store's settings. Use ``engine.execution_options(agentsleep_write=True)`` for
    connections that write (``BEGIN IMMEDIATE`` on SQLite; no difference on Postgres).

    A SQLite file is checked before anything touches it (`check_sqlite_file`): its directory must exist (nothing is
    created but the database file itself), a 0-byte file is refused rather than silently made a new store, and with
    ``create=False`` the file must already exist.
    """
    u = normalise_url(url)
    kwargs: dict[str, Any] = dict(engine_kwargs or {})
    if u.get_backend_name() == "sqlite":
        memory = u.database in (None, "", ":memory:")
        if memory:  # one shared connection, or every checkout would see a different empty database
            kwargs.setdefault("poolclass", StaticPool)
        else:
            check_sqlite_file(Path(u.database), create=create)  # type: ignore[arg-type]
        kwargs.setdefault("connect_args", {}).setdefault("timeout", busy_timeout_s)
        engine = create_engine(u, **kwargs)
        _sqlite_events(engine, synchronous=sqlite_synchronous, busy_timeout_ms=int(busy_timeout_s * 1000))
    else:
        kwargs.setdefault("pool_pre_ping", True)  # survive a restarted server between calls
        connect_args = kwargs.setdefault("connect_args", {})
        connect_args.setdefault("connect_timeout", max(1, int(busy_timeout_s)))
        engine = create_engine(u, **kwargs)
    return engine


def check_sqlite_file(path: Path, *, create: bool) -> None:
    """Refuse SQLite paths that would silently become something other than the store the caller meant.

    Raises:
        StoreError: the directory does not exist (no silent ``mkdir``: a typo in the URL must not create a tree),
            the path is a directory, the file is empty (SQLite would quietly initialise a 0-byte file, e.g. one
            truncated by a failed copy, as a new, empty store), or ``create=False`` and there is no file.
    """
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise StoreError(
            f"cannot open the snapshot store {str(path)!r}: directory {str(parent)!r} does not exist "
            "(create it first, or fix the URL)"
        )
    if path.is_dir():
        raise StoreError(f"cannot open the snapshot store {str(path)!r}: it is a directory, not a database file")
    if path.exists():
        if path.stat().st_size == 0 and not _fills_soon(path):
            raise StoreError(
                f"the snapshot store file {str(path)!r} is empty (0 bytes): it is not a database, perhaps truncated "
                "by a failed copy; restore it from a backup, or delete it to start a new store"
            )
    elif not create:
        raise StoreError(f"no snapshot store at {str(path)!r} (the file does not exist)")


def _fills_soon(path: Path, wait_s: float = _EMPTY_FILE_WAIT_S) -> bool:
    """Whether a 0-byte file is a store being created right now: SQLite creates the file empty on connect and
    writes its header a moment later (our first statement, ``PRAGMA journal_mode = WAL``), so a concurrent opener
    may see it empty for a few milliseconds. A damaged or truncated file stays empty."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.01)
        try:
            if path.stat().st_size > 0:
                return True
        except FileNotFoundError:
            return False
    return False


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


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic's object filter: procrastinate's tables (installed by migration 0004, owned by procrastinate) are
    not the store's models, so autogenerate and `compare_metadata` leave them alone."""
    return not (type_ == "table" and name is not None and name.startswith("procrastinate_"))


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


def upgrade(engine: Engine, revision: str = "head", *, create: bool = True) -> None:
    """Bring the schema to ``revision`` under a lock, so concurrent openers migrate exactly once.

    ``create=False``: refuse a database that holds no snapshot store yet instead of creating one in it.

    Raises:
        StoreError: unreachable, not a database (e.g. a damaged SQLite file), a schema newer than this code, or no
            store there with ``create=False``.
    """
    head = head_revision()
    try:
        current = current_revision(engine)
        if revision == "head" and current == head:
            return
        if current is None and not create:
            raise StoreError(
                f"no agentsleep snapshot store at {engine.url.render_as_string()} (no schema there); "
                "check the URL, or open it with create=True to make a new store"
            )
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
    except DBAPIError as e:  # unreachable server, "file is not a database", "database disk image is malformed"
        raise StoreError(
            f"could not open the snapshot store at {engine.url.render_as_string()}: {one_line(e.orig)}"
        ) from e


__all__ = [
    "alembic_config",
    "check_sqlite_file",
    "current_revision",
    "head_revision",
    "include_name",
    "make_engine",
    "normalise_url",
    "one_line",
    "upgrade",
    "writer",
]
