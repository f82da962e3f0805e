"""Checks on an agent's stored lineage, shared by the host, live and reliability tests (no pytest here)."""

from __future__ import annotations

import itertools

from agentsleep.store import SnapshotRecord, SnapshotStore


def stream_of(store: SnapshotStore, agent: str) -> dict[int, int]:
    """The token at each stream position, read off the windows of the current snapshot's lineage (a snapshot's
    window holds positions ``tokens_consolidated ...``). Asserts that every snapshot agrees with the others."""
    tokens: dict[int, int] = {}
    current = store.current_id(agent)
    assert current is not None
    for rec in store.lineage(current):
        for i, t in enumerate(store.load(rec.id).window):
            pos = rec.tokens_consolidated + i
            assert tokens.setdefault(pos, t) == t, f"snapshot {rec.id} disagrees with its lineage at position {pos}"
    return tokens


def assert_monotone(lineage: list[SnapshotRecord]) -> None:
    """Along a lineage nothing goes backwards: seq, tokens_consolidated, sleep_count, tokens_seen."""
    for a, b in itertools.pairwise(lineage):
        assert b.seq > a.seq or b.agent_id != a.agent_id, (a, b)
        assert b.tokens_consolidated >= a.tokens_consolidated, (a, b)
        assert b.meta["sleep_count"] >= a.meta["sleep_count"], (a.meta, b.meta)
        assert b.meta["tokens_seen"] >= a.meta["tokens_seen"], (a.meta, b.meta)
