"""SQLAlchemy 2.0 models of the snapshot store: `Agent`, `Snapshot`.

An agent's memory is its fast weights plus its current window; a `Snapshot` row holds both (the payload, see
`payload.py`) with its lineage and metadata. `Agent.current_snapshot_id` points at the snapshot the agent revives from.
The schema itself is owned by the Alembic migrations in `migrations/versions/`; a test checks they equal these models.
Sleep jobs live in procrastinate's own tables (installed by migration 0004 on Postgres, see `jobs.py`), not here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from agentsleep.ids import ID_LEN  # agent ids are chosen by callers; snapshot ids are 32-char uuid hex

# Stable constraint names, so migrations name the same constraint identically on SQLite and Postgres.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

FINGERPRINT_LEN = 128


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive; we re-attach UTC on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        bytes: LargeBinary(),
        int: Integer(),
        str: Text(),
    }


class Agent(Base):
    """One agent: its model fingerprint (fixed at first save) and the snapshot it currently revives from."""

    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_LEN))
    # {"ssm.0": [B, H, K, V], ...}: the fixed-size part of the state, checked on every save (see store.save).
    state_shapes: Mapped[dict[str, Any]]
    # Highest sequence number ever handed out; bumped under the agent's row lock so numbers never repeat,
    # not even after prune deleted the newest rows of a rewound agent.
    last_seq: Mapped[int] = mapped_column(default=0)
    # use_alter: agents <-> snapshots reference each other; Postgres needs one side added after both tables exist.
    current_snapshot_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("snapshots.id", ondelete="SET NULL", use_alter=True)
    )

    snapshots: Mapped[list[Snapshot]] = relationship(
        back_populates="agent",
        foreign_keys="Snapshot.agent_id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )
    current_snapshot: Mapped[Snapshot | None] = relationship(foreign_keys=[current_snapshot_id], post_update=True)

    def __repr__(self) -> str:
        return f"Agent(id={self.id!r}, fingerprint={self.fingerprint!r}, current={self.current_snapshot_id!r})"


class Snapshot(Base):
    """One saved memory of one agent: fast weights + window token ids (the payload) and where it came from."""

    __tablename__ = "snapshots"
    __table_args__ = (
        UniqueConstraint("agent_id", "seq"),
        CheckConstraint("seq >= 1", name="seq_positive"),
        CheckConstraint("passes >= 1", name="passes_positive"),
        CheckConstraint("byte_size >= 0", name="byte_size_nonnegative"),
        # exactly one home for the payload: inline blob or content-addressed file
        CheckConstraint("(payload IS NULL) <> (payload_path IS NULL)", name="payload_one_home"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("agents.id", ondelete="CASCADE"))
    # Lineage: the snapshot this one was consolidated from (or forked/imported from). Prune may delete a parent; the
    # reference then becomes NULL, because every snapshot is a complete state and needs no ancestor to load.
    parent_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("snapshots.id", ondelete="SET NULL"))
    seq: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(String(32))
    passes: Mapped[int]
    tokens_consolidated: Mapped[int] = mapped_column(BigInteger)
    window_len: Mapped[int]
    fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_LEN))
    byte_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    format_version: Mapped[int]
    thread_id: Mapped[str | None] = mapped_column(String(ID_LEN))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    # Deferred: listing and history never pull payloads; load() undefers it explicitly.
    payload: Mapped[bytes | None] = mapped_column(deferred=True)
    payload_path: Mapped[str | None] = mapped_column(String(200))  # relative to the store's blob_dir
    # sha256 over the fields above that describe the memory (digest.py); NULL never verifies. Nullable in the schema
    # only because SQLite cannot add a NOT NULL column to existing rows without rebuilding the table (migration 0003).
    record_sha256: Mapped[str | None] = mapped_column(String(64))

    agent: Mapped[Agent] = relationship(back_populates="snapshots", foreign_keys=[agent_id])
    parent: Mapped[Snapshot | None] = relationship(remote_side=[id], back_populates="children")
    children: Mapped[list[Snapshot]] = relationship(back_populates="parent", passive_deletes=True)

    def __repr__(self) -> str:
        return (
            f"Snapshot(id={self.id!r}, agent={self.agent_id!r}, seq={self.seq}, fingerprint={self.fingerprint!r}, "
            f"bytes={self.byte_size})"
        )


Index("ix_snapshots_parent_id", Snapshot.parent_id)
Index("ix_snapshots_payload_path", Snapshot.payload_path)  # reference counting of content-addressed files


__all__ = ["NAMING_CONVENTION", "Agent", "Base", "Snapshot", "UTCDateTime", "utcnow"]
