"""Persistence of agents' memories: per-agent fast-weight snapshots in SQLite or Postgres.

    from agentsleep.store import SnapshotStore
    store = SnapshotStore("sqlite:///agentsleep.db")        # or "postgresql+psycopg://user:pw@host/db"
    rec = store.save("alice", state, window, reason="sleep", passes=4)
    snap = store.latest("alice", fingerprint=model.fingerprint)   # .state (FastWeights), .window, .record

See docs/store.md for the schema, durability settings and lineage/prune semantics.
"""

from agentsleep.store.models import Agent, Base, SleepJob, Snapshot
from agentsleep.store.records import AgentRecord, LoadedSnapshot, SleepJobRecord, SnapshotRecord
from agentsleep.store.store import DEFAULT_INLINE_LIMIT, DEFAULT_URL, SnapshotStore

__all__ = [
    "DEFAULT_INLINE_LIMIT",
    "DEFAULT_URL",
    "Agent",
    "AgentRecord",
    "Base",
    "LoadedSnapshot",
    "SleepJob",
    "SleepJobRecord",
    "Snapshot",
    "SnapshotRecord",
    "SnapshotStore",
]
