"""One exception hierarchy for the whole product.

Every error says what was wrong and what to do about it. Catch `AgentSleepError` to catch them all.
Each class also derives from the closest builtin (ValueError, KeyError, ...) so generic handlers still work.
"""

from __future__ import annotations


class AgentSleepError(Exception):
    """Base class of every error agentsleep raises on purpose."""


class InvalidInput(AgentSleepError, ValueError):
    """An argument has the wrong shape, type, range or encoding (e.g. an empty turn, non-UTF-8 bytes)."""


class ConfigError(AgentSleepError, ValueError):
    """A configuration is inconsistent (e.g. a head size the serving kernels cannot run)."""


class UnsupportedBackend(ConfigError):
    """The operation needs something this store's database does not have, e.g. sleep workers (procrastinate, a
    Postgres task queue) asked of a SQLite store. Use Postgres for it, or keep the work in process."""


class WindowOverflow(AgentSleepError, ValueError):
    """More tokens than the attention window can hold; sleep first or split the input."""


class SnapshotError(AgentSleepError):
    """Base class of snapshot (fast-weight state) problems."""


class SnapshotCorrupt(SnapshotError, ValueError):
    """Snapshot bytes are truncated, damaged or not a snapshot at all; nothing was loaded."""


class SnapshotMismatch(SnapshotError, ValueError):
    """A well-formed snapshot that belongs to another model (fingerprint, shapes or dtype differ)."""


class UnknownAgent(AgentSleepError, KeyError):
    """No agent with this id exists (in the engine or the store)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown agent"


class UnknownSnapshot(SnapshotError, KeyError):
    """No snapshot with this id exists."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown snapshot"


class StoreError(AgentSleepError):
    """The snapshot store could not complete an operation (database unreachable, constraint violated)."""


class SnapshotConflict(StoreError):
    """A compare-and-set save lost: the agent's current snapshot is no longer the one the caller expected (another
    writer saved in between). Nothing was written; reload the agent's latest snapshot and redo the work on it."""


class CheckpointError(AgentSleepError, ValueError):
    """A model checkpoint directory is missing files or holds inconsistent ones."""


class SleepFailed(AgentSleepError):
    """A sleep (consolidation) did not complete; the agent keeps its last good state."""


class EngineError(AgentSleepError):
    """The model runner (torch or vLLM) failed to serve a request."""


__all__ = [
    "AgentSleepError",
    "CheckpointError",
    "ConfigError",
    "EngineError",
    "InvalidInput",
    "SleepFailed",
    "SnapshotConflict",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotMismatch",
    "StoreError",
    "UnknownAgent",
    "UnknownSnapshot",
    "UnsupportedBackend",
    "WindowOverflow",
]
