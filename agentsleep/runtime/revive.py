"""Agents in and out of a `SnapshotStore`, for any `Engine` (the snapshot convention is in `runtime.engine`).

A snapshot holds (the state the window started from, the window's token ids); the store's row keeps
``tokens_consolidated`` and its metadata keeps the other counters, so a revived agent continues its books too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from agentsleep.model.state import FastWeights
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
    new_agent: bool = False,
    max_window: int | None = None,
    parent_id: str | None = None,
) -> SnapshotRecord:
    """Save ``memory`` as the agent's newest snapshot (parent: its current one) and return the record.

    The metadata always carries the counters `memory_from_snapshot` reads back (sleep_count, tokens_seen).
    ``expect_current``: a compare-and-set on the agent's current snapshot id (`SnapshotStore.save`); raises
    `SnapshotConflict` and writes nothing when another writer moved the agent on. Every writer of a live agent
    passes the snapshot its memory descends from (the one it loaded or last saved), so a newer consolidation by
    another process is never overwritten. ``new_agent``: the save creates the agent (`InvalidInput` if it exists).
    ``max_window``: the model's window limit, ``engine.window + 1`` (L plus the one generated token that may wait
    for the next window); the store itself knows no model. ``parent_id``: the lineage parent when it is not the
    agent's current snapshot (a rewind, see `SnapshotStore.save`).
    """
    meta = {"sleep_count": memory.sleep_count, "tokens_seen": memory.tokens_seen, **(metadata or {})}
    return store.save(
        agent_id,
        wire_state(memory.state),
        list(memory.window),
        reason=reason,
        passes=passes,
        tokens_consolidated=memory.tokens_consolidated,
        thread_id=thread_id,
        metadata=meta,
        expect_current=expect_current,
        new_agent=new_agent,
        max_window=max_window,
        parent_id=parent_id,
    )


def wire_state(state: FastWeights) -> FastWeights:
    """The state as snapshots hold it: float32, the snapshot format's one dtype. A model that computes in another
    dtype (float64 in the precision tests, a half-precision build) has its fast weights converted here, where the
    model is known; the store itself refuses any other dtype rather than cast behind the caller's back."""
    tensors = state.tensors().values()
    if all(t.dtype == torch.float32 for t in tensors):
        return state
    return FastWeights(
        ssm=[s.float() for s in state.ssm],
        kv=[(k.float(), v.float()) for k, v in state.kv],
        kv_valid=None if state.kv_valid is None else state.kv_valid.float(),
        fingerprint=state.fingerprint,
        batch=state.batch,
    )


def window_limit(engine: Engine) -> int:
    """The longest window a memory of ``engine``'s model may carry: L, plus one generated token waiting for the
    next window (see the snapshot convention in `runtime.engine`). Pass it as ``max_window`` to `save_memory`."""
    return engine.window + 1


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


__all__ = ["memory_from_snapshot", "revive", "save_memory", "window_limit", "wire_state"]
