"""Agents in and out of a `SnapshotStore`, for any `Engine` (the snapshot convention is in `runtime.engine`).

A snapshot holds (the state the window started from, the window's token ids); the store's row keeps
``tokens_consolidated`` and its metadata keeps the other counters, so a revived agent continues its books too.
"""

from __future__ import annotations

import logging
from typing import Any

from agentsleep.runtime.engine import AgentMemory, AgentSession, Engine
from agentsleep.store import LoadedSnapshot, SnapshotRecord, SnapshotStore

logger = logging.getLogger(__name__)


def memory_from_snapshot(loaded: LoadedSnapshot) -> AgentMemory:
    """The `AgentMemory` a loaded snapshot describes."""
    meta = loaded.record.meta
    return AgentMemory(
        state=loaded.state,
        window=tuple(int(t) for t in loaded.window),
        tokens_consolidated=loaded.record.tokens_consolidated,
        sleep_count=_int(meta.get("sleep_count")),
        tokens_seen=_int(meta.get("tokens_seen")),
    )


def save_memory(
    store: SnapshotStore,
    agent_id: str,
    memory: AgentMemory,
    *,
    reason: str,
    passes: int,
    metadata: dict[str, Any] | None = None,
    thread_id: str | None = None,
    expect_current: str | None = None,
) -> SnapshotRecord:
    """Save ``memory`` as the agent's newest snapshot (parent: its current one) and return the record.

    The metadata always carries the counters `memory_from_snapshot` reads back (sleep_count, tokens_seen).
    ``expect_current``: a compare-and-set on the agent's current snapshot id (`SnapshotStore.save`); raises
    `SnapshotConflict` and writes nothing when another writer moved the agent on.
    """
    meta = {"sleep_count": memory.sleep_count, "tokens_seen": memory.tokens_seen, **(metadata or {})}
    return store.save(
        agent_id,
        memory.state,
        list(memory.window),
        reason=reason,
        passes=passes,
        tokens_consolidated=memory.tokens_consolidated,
        thread_id=thread_id,
        metadata=meta,
        expect_current=expect_current,
    )


def revive(engine: Engine, store: SnapshotStore, agent_id: str, snapshot_id: str | None = None) -> AgentSession:
    """Load ``agent_id`` into ``engine`` from its latest snapshot (or from ``snapshot_id``) and continue from there.

    Works on a fresh process: the snapshot carries everything the agent was (S and its window). A snapshot of another
    agent may be revived under ``agent_id`` too (that is a fork; the store's lineage is not touched until it saves).

    Raises:
        UnknownAgent: the store has no such agent. UnknownSnapshot: no such snapshot, or the agent has none.
        SnapshotMismatch: the snapshot belongs to another model. SnapshotCorrupt: its bytes are damaged.
    """
    if snapshot_id is None:
        loaded = store.latest(agent_id, fingerprint=engine.fingerprint)
    else:
        loaded = store.load(snapshot_id, fingerprint=engine.fingerprint)
        if loaded.record.agent_id != agent_id:
            logger.info("reviving snapshot %s of agent %r as agent %r", snapshot_id, loaded.record.agent_id, agent_id)
    session = engine.import_state(agent_id, memory_from_snapshot(loaded), snapshot_id=loaded.record.id)
    logger.info(
        "revived agent %r from snapshot %s (seq %d, %d window tokens)",
        agent_id,
        loaded.record.id,
        loaded.record.seq,
        len(loaded.window),
    )
    return session


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


__all__ = ["memory_from_snapshot", "revive", "save_memory"]
