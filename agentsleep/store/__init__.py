"""Persistence of agents' memories: per-agent fast-weight snapshots in SQLite or Postgres.

    from agentsleep.store import SnapshotStore
    store = SnapshotStore("sqlite:///agentsleep.db")        # or "postgresql+psycopg://user:pw@host/db"
    rec = store.save("alice", state, window, reason="sleep", passes=4)
    snap = store.latest("alice", fingerprint=model.fingerprint)   # .state (FastWeights), .window, .record

See docs/store.md for the schema, durability settings and lineage/prune semantics. Sleep jobs for scale-out workers
(`SnapshotStore.enqueue_sleep`, Postgres) are queued in procrastinate's tables; the workers are
`agentsleep.memory.worker`.
"""

from agentsleep.store.models import Agent, Base, Snapshot
from agentsleep.store.records import AgentRecord, LoadedSnapshot, SleepJobRecord, SnapshotRecord
from agentsleep.store.store import DEFAULT_INLINE_LIMIT, DEFAULT_URL, MAX_WINDOW_TOKENS, SnapshotStore

__all__ = [
    "DEFAULT_INLINE_LIMIT",
    "DEFAULT_URL",
    "MAX_WINDOW_TOKENS",
    "Agent",
    "AgentRecord",
    "Base",
    "LoadedSnapshot",
    "SleepJobRecord",
    "Snapshot",
    "SnapshotRecord",
    "SnapshotStore",
]
