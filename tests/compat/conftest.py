"""A fresh working copy of the 0.1.0 fixture store per test, on SQLite and on Postgres (rows copied verbatim)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agentsleep.store import SnapshotStore
from tests.store.conftest import postgres_db, postgres_schema_url, postgres_server_url  # noqa: F401  (fixtures)

from .helpers import copy_rows, sqlite_copy


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def old_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a store holding exactly what agentsleep 0.1.0 wrote (the fixture)."""
    url = sqlite_copy(tmp_path / "store.db")
    if request.param == "sqlite":
        return url
    pg = request.getfixturevalue("postgres_schema_url")
    copy_rows(url, pg)
    return pg


@pytest.fixture
def old_store(old_store_url: str) -> Iterator[SnapshotStore]:
    with SnapshotStore(old_store_url) as s:
        yield s
