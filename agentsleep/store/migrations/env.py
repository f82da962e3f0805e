"""Alembic environment of the snapshot store.

`SnapshotStore` runs migrations programmatically and hands over an open connection (already in a transaction that
holds the migration lock) via ``config.attributes["connection"]``. Run by the ``alembic`` command instead (with
``-c agentsleep/store/migrations/alembic.ini``), it connects to ``AGENTSLEEP_STORE_URL`` itself.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine

from agentsleep.store.engine import include_name
from agentsleep.store.models import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER constraints; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_name=include_name,  # procrastinate's tables are procrastinate's
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get(
        "AGENTSLEEP_STORE_URL", "sqlite:///agentsleep.db"
    )
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
