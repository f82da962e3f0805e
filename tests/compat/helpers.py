"""The 0.1.0 fixture (tests/fixtures/compat/v0.1.0): paths, expectations, and working copies of its store on SQLite
or Postgres (opening a store migrates its schema, so tests never open the committed file)."""

from __future__ import annotations

import json
import sqlite3
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, text, update

from agentsleep.model.hybrid import SleepHybrid
from agentsleep.runtime import SamplingParams, TorchEngine
from agentsleep.store import Base, SnapshotStore

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


def copy_rows(src: SnapshotStore, dst: SnapshotStore) -> None:
    """Every agent, snapshot and sleep job of ``src`` into the empty store ``dst``, ids and lineage kept (parents
    first), so a Postgres store holds exactly what the 0.1.0 SQLite store holds."""
    tables = Base.metadata.tables
    agents, snaps, jobs = tables["agents"], tables["snapshots"], tables["sleep_jobs"]
    with src.engine.connect() as a:
        agent_rows = [dict(r._mapping) for r in a.execute(select(agents))]
        snap_rows = [dict(r._mapping) for r in a.execute(select(snaps))]
        job_rows = [dict(r._mapping) for r in a.execute(select(jobs))]
    ordered, done = [], set()
    while len(ordered) < len(snap_rows):
        for r in snap_rows:
            if r["id"] not in done and (r["parent_id"] is None or r["parent_id"] in done):
                ordered.append(r)
                done.add(r["id"])
    with dst.engine.begin() as b:
        b.execute(insert(agents), [dict(r, current_snapshot_id=None) for r in agent_rows])
        b.execute(insert(snaps), ordered)
        for r in agent_rows:
            b.execute(update(agents).where(agents.c.id == r["id"]).values(current_snapshot_id=r["current_snapshot_id"]))
        b.execute(insert(jobs), job_rows)
        if dst.dialect == "postgresql":  # explicit ids leave the serial behind
            b.execute(
                text("SELECT setval(pg_get_serial_sequence('sleep_jobs', 'id'), (SELECT max(id) FROM sleep_jobs))")
            )


def greedy(engine: TorchEngine, agent: str, prompt: list[int], n: int) -> list[int]:
    return list(engine.generate(agent, prompt, SamplingParams(max_new_tokens=n)).tokens)


def replies(agent: str | None = None) -> list[dict[str, Any]]:
    return [r for r in expected()["replies"] if agent is None or r["agent"] == agent]
