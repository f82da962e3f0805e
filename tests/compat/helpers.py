"""The 0.1.0 fixture (tests/fixtures/compat/v0.1.0): paths, expectations, and working copies of its store on SQLite
or Postgres (opening a store migrates its schema, so tests never open the committed file)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, create_engine, insert, select, update

from agentsleep.model.hybrid import SleepHybrid
from agentsleep.runtime import SamplingParams, TorchEngine
from agentsleep.store.engine import make_engine, upgrade

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "compat" / "v0.1.0"
CHECKPOINTS = FIXTURE / "checkpoints"
AGENTS = ("alice", "bob", "carol", "sam")

# The current-rule (v2) fingerprints of the fixture's checkpoints. A pin, on purpose: a model whose weights and
# computation did not change must keep its fingerprint in every later release. If this fails after adding a
# HybridConfig field, the field's default is not neutral (see docs/store.md, "Fingerprints"); if the v2 recipe itself
# changed, that is a new rule (v3) and v2 must stay an accepted alias.
V2 = {"hard": "v2:a61dc89803b17e2cba7131ced8133a6d", "sliding": "v2:4d0f85fff88d5f36f6f3370d73ef5c05"}


@cache
def expected() -> dict[str, Any]:
    return json.loads((FIXTURE / "expected.json").read_text())


@cache
def model(name: str) -> SleepHybrid:
    """A fixture checkpoint, loaded once per process (treat it as read-only)."""
    return SleepHybrid.from_pretrained(CHECKPOINTS / name)


def model_of(agent: str) -> SleepHybrid:
    return model(expected()["agents"][agent]["checkpoint"])


def sqlite_copy(dst: Path) -> str:
    """A copy of the fixture store at ``dst``; returns its URL."""
    with sqlite3.connect(FIXTURE / "store.db") as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()
    return f"sqlite:///{dst}"


def copy_rows(src_url: str, dst_url: str) -> None:
    """Every agent, snapshot and sleep job of the 0.1.0 store at ``src_url`` (not migrated) into an empty Postgres
    store at ``dst_url`` brought to 0.1.0's schema (revision 0002), ids and lineage kept (parents first). Opening
    ``dst_url`` with `SnapshotStore` afterwards runs the real upgrade a 0.1.0 deployment gets (checksums back-filled,
    waiting sleep jobs carried over to procrastinate)."""
    src, dst = create_engine(src_url), make_engine(dst_url)
    try:
        upgrade(dst, "0002")
        have, want = MetaData(), MetaData()
        have.reflect(src, only=["agents", "snapshots", "sleep_jobs"])
        want.reflect(dst, only=["agents", "snapshots", "sleep_jobs"])
        with src.connect() as a:
            rows = {t: [_utc(dict(r._mapping)) for r in a.execute(select(have.tables[t]))] for t in have.tables}
        ordered, done = [], set()
        while len(ordered) < len(rows["snapshots"]):
            for r in rows["snapshots"]:
                if r["id"] not in done and (r["parent_id"] is None or r["parent_id"] in done):
                    ordered.append(r)
                    done.add(r["id"])
        agents, snaps, jobs = (want.tables[t] for t in ("agents", "snapshots", "sleep_jobs"))
        with dst.begin() as b:
            b.execute(insert(agents), [dict(r, current_snapshot_id=None) for r in rows["agents"]])
            b.execute(insert(snaps), ordered)
            for r in rows["agents"]:
                b.execute(
                    update(agents).where(agents.c.id == r["id"]).values(current_snapshot_id=r["current_snapshot_id"])
                )
            b.execute(insert(jobs), rows["sleep_jobs"])
    finally:
        src.dispose()
        dst.dispose()


def _utc(row: dict[str, Any]) -> dict[str, Any]:
    """SQLite hands timestamps back naive; 0.1.0 wrote them in UTC."""
    return {k: v.replace(tzinfo=UTC) if isinstance(v, datetime) and v.tzinfo is None else v for k, v in row.items()}


def greedy(engine: TorchEngine, agent: str, prompt: list[int], n: int) -> list[int]:
    return list(engine.generate(agent, prompt, SamplingParams(max_new_tokens=n)).tokens)


def replies(agent: str | None = None) -> list[dict[str, Any]]:
    return [r for r in expected()["replies"] if agent is None or r["agent"] == agent]
