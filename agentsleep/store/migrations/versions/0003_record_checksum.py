"""A checksum over every snapshot row field that describes the memory (see agentsleep/store/digest.py).

Existing rows get theirs computed from what they hold now: a row edited before this migration cannot be detected,
every change after it can.

Revision ID: 0003
Revises: 0002
Create Date: 2026-02-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from agentsleep.store.digest import record_digest_v1
from agentsleep.store.models import UTCDateTime

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 500

# The columns as of this revision, typed so created_at comes back as an aware datetime and metadata as a dict.
_snapshots = sa.table(
    "snapshots",
    sa.column("id", sa.String(32)),
    sa.column("agent_id", sa.String(128)),
    sa.column("parent_id", sa.String(32)),
    sa.column("seq", sa.Integer()),
    sa.column("created_at", UTCDateTime()),
    sa.column("reason", sa.String(32)),
    sa.column("passes", sa.Integer()),
    sa.column("tokens_consolidated", sa.BigInteger()),
    sa.column("window_len", sa.Integer()),
    sa.column("fingerprint", sa.String(128)),
    sa.column("byte_size", sa.BigInteger()),
    sa.column("sha256", sa.String(64)),
    sa.column("format_version", sa.Integer()),
    sa.column("thread_id", sa.String(128)),
    sa.column("metadata", sa.JSON()),
    sa.column("record_sha256", sa.String(64)),
)


def upgrade() -> None:
    # Nullable in the schema: making it NOT NULL would rebuild the table on SQLite, whose foreign-key actions would
    # fire on the rebuild. Every row is filled below and by every save; the store treats NULL as a failed check.
    op.add_column("snapshots", sa.Column("record_sha256", sa.String(length=64), nullable=True))
    bind = op.get_bind()
    fields = [c for c in _snapshots.c if c.name != "record_sha256"]
    rows = bind.execute(sa.select(*fields)).mappings().all()
    for i in range(0, len(rows), _BATCH):
        for r in rows[i : i + _BATCH]:
            digest = record_digest_v1(**{k: r[k] for k in r.keys() if k != "metadata"}, metadata=r["metadata"])
            bind.execute(sa.update(_snapshots).where(_snapshots.c.id == r["id"]).values(record_sha256=digest))


def downgrade() -> None:
    op.drop_column("snapshots", "record_sha256")  # SQLite >= 3.35 drops a plain column in place
