"""Store fixtures: every `store` / `store_url` test runs against SQLite (a temp file) and Postgres.

Postgres: the server URL comes from ``AGENTSLEEP_TEST_POSTGRES_URL``; if unset, a server already listening at the URL
``scripts/postgres.sh`` prints is used, else that script is run once per session to install/start one. Without a
server the Postgres cases fail when ``CI`` is set and are skipped otherwise. The session creates one scratch database
(dropped at the end) and every test gets its own schema in it (``search_path`` in the URL), so tests are isolated
and spawned subprocesses can open the same schema by URL.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import URL

from agentsleep.store import SnapshotStore

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PG_URL = "postgresql+psycopg://agentsleep:agentsleep@127.0.0.1:5432/agentsleep"
HOW_TO = (
    "start one with `bash scripts/postgres.sh` and export AGENTSLEEP_TEST_POSTGRES_URL=<the URL it prints>, "
    "or deselect with -m 'not postgres'"
)


def _reachable(url: str) -> str | None:
    """None if we can connect, else the reason."""
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as c:
            c.execute(text("select 1"))
        return None
    except Exception as e:  # any driver/network error means "not usable"
        return str(e).splitlines()[0]
    finally:
        engine.dispose()


def _unavailable(reason: str) -> None:
    msg = f"no PostgreSQL for the store tests ({reason}); {HOW_TO}"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    url = os.environ.get("AGENTSLEEP_TEST_POSTGRES_URL")
    if url:
        why = _reachable(url)
        if why:
            _unavailable(f"AGENTSLEEP_TEST_POSTGRES_URL unreachable: {why}")
        return url
    if _reachable(DEFAULT_PG_URL) is None:  # already running (e.g. an earlier scripts/postgres.sh)
        return DEFAULT_PG_URL
    try:
        out = subprocess.run(
            ["bash", str(ROOT / "scripts" / "postgres.sh")], capture_output=True, text=True, timeout=300, check=True
        )
        url = out.stdout.strip().splitlines()[-1]
    except (subprocess.SubprocessError, OSError, IndexError) as e:
        _unavailable(f"scripts/postgres.sh failed: {e}")
    why = _reachable(url)
    if why:
        _unavailable(f"{url} unreachable after scripts/postgres.sh: {why}")
    return url


@pytest.fixture(scope="session")
def postgres_db(postgres_server_url: str) -> Iterator[URL]:
    """A scratch database for this session, dropped afterwards."""
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    name = f"agentsleep_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_server_url).set(database=name)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_schema_url(postgres_db: URL) -> Iterator[str]:
    """A fresh, empty schema for one test, as a URL whose connections use it by default."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_db, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield postgres_db.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_schema_url")


@pytest.fixture
def store(store_url: str) -> Iterator[SnapshotStore]:
    s = SnapshotStore(store_url)
    try:
        yield s
    finally:
        s.close()
