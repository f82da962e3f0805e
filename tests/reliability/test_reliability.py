"""The reliability suite at CI scale (``python -m tests.reliability --scale full`` runs it at the review's size and
prints the table in docs/store.md): every scenario on SQLite and Postgres must lose nothing acknowledged, raise only
typed errors and never return wrong data."""

from __future__ import annotations

from pathlib import Path

import pytest

from .report import Row
from .suite import SMALL, scenarios

# (scenario, backend): the sleep-job queue exists on Postgres only (SQLite refuses workers: test_worker.py)
CASES = [
    pytest.param(name, b, id=f"{name}-{b}", marks=[pytest.mark.postgres] if b == "postgres" else [])
    for name, pg_only, _ in scenarios(SMALL, Path("."))
    for b in (["postgres"] if pg_only else ["sqlite", "postgres"])
]


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_scenario(name: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = (
        f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_schema_url")
    )
    (run,) = [run for n, _, run in scenarios(SMALL, tmp_path) if n == name]
    row: Row = run(url)
    assert row.operations > 0, row
    assert row.clean, row
    if name in ("sigkill", "race", "cas", "park", "queue"):
        assert row.acknowledged > 0, row
