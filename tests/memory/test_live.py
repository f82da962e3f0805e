"""In real time: a live host taking turns and two sleep workers consolidating the same agent (SQLite: threads
calling `consolidate`; Postgres: procrastinate workers fed by a thread that keeps enqueueing). No save overwrites
another, nothing goes backwards, every acknowledged turn is in the lineage (see tests/memory/live.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.helpers import make_model

from .live import run_live


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'live.db'}"
    return request.getfixturevalue("postgres_schema_url")


def test_a_live_host_and_two_workers_never_overwrite_each_other(url: str) -> None:
    result = run_live(url, make_model(window=32, passes=2), turns=30, workers=2, min_worker_sleeps=3, seed=1)
    assert result.lost_tokens == 0
    assert result.worker_sleeps >= 3  # the workers' consolidations landed and stayed in the lineage
    assert result.host_merges >= 1  # and the host merged at least one instead of overwriting it
    assert result.snapshots > result.turns  # every turn saved, plus the sleeps
