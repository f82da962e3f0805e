"""Plain, immutable views of store rows, returned by `SnapshotStore` (no ORM objects escape the store)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from agentsleep.model.state import FastWeights
    from agentsleep.store.models import Agent, Snapshot

Storage = Literal["inline", "file"]


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """A snapshot's metadata (everything but the payload)."""

    id: str
    agent_id: str
    parent_id: str | None
    seq: int
    created_at: datetime
    reason: str
    passes: int
    tokens_consolidated: int
    window_len: int
    fingerprint: str
    byte_size: int
    sha256: str
    format_version: int
    storage: Storage
    thread_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    record_sha256: str | None = None  # checksum of the fields above that describe the memory (store/digest.py)

    @classmethod
    def from_row(cls, s: Snapshot) -> SnapshotRecord:
        return cls(
            id=s.id,
            agent_id=s.agent_id,
            parent_id=s.parent_id,
            seq=s.seq,
            created_at=s.created_at,
            reason=s.reason,
            passes=s.passes,
            tokens_consolidated=s.tokens_consolidated,
            window_len=s.window_len,
            fingerprint=s.fingerprint,
            byte_size=s.byte_size,
            sha256=s.sha256,
            format_version=s.format_version,
            storage="file" if s.payload_path is not None else "inline",
            thread_id=s.thread_id,
            meta=dict(s.meta or {}),
            record_sha256=s.record_sha256,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (datetimes as ISO 8601)."""
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An agent's row plus a few aggregates for listings."""

    id: str
    created_at: datetime
    fingerprint: str
    state_shapes: dict[str, list[int]]
    current_snapshot_id: str | None
    last_seq: int
    n_snapshots: int = 0
    current_seq: int | None = None

    @classmethod
    def from_row(cls, a: Agent, n_snapshots: int = 0, current_seq: int | None = None) -> AgentRecord:
        return cls(
            id=a.id,
            created_at=a.created_at,
            fingerprint=a.fingerprint,
            state_shapes={k: list(v) for k, v in (a.state_shapes or {}).items()},
            current_snapshot_id=a.current_snapshot_id,
            last_seq=a.last_seq,
            n_snapshots=n_snapshots,
            current_seq=current_seq,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


@dataclass(frozen=True)
class LoadedSnapshot:
    """A verified snapshot: its metadata, the fast weights and the window token ids."""

    record: SnapshotRecord
    state: FastWeights
    window: list[int]


JobStatus = Literal["todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted"]
"""procrastinate's job states: waiting, running, and the final ones (``aborting`` is a legacy state it never sets)."""


@dataclass(frozen=True, slots=True)
class SleepJobRecord:
    """A sleep job in procrastinate's queue (see `SnapshotStore.enqueue_sleep`).

    ``passes`` is the job's N (None: the worker's default); ``attempts`` counts finished attempts (retries and
    recoveries of a dead worker's job included); ``worker_id`` is procrastinate's id of the worker running it.
    """

    id: int
    agent_id: str
    status: JobStatus
    passes: int | None
    attempts: int
    queue: str
    worker_id: int | None = None
    scheduled_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scheduled_at"] = self.scheduled_at.isoformat() if self.scheduled_at else None
        return d


__all__ = ["AgentRecord", "LoadedSnapshot", "SleepJobRecord", "SnapshotRecord", "Storage"]
