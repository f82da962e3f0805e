"""Agents and their snapshots.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    # agents <-> snapshots reference each other. SQLite accepts a foreign key to a table created later (and cannot
    # add one afterwards); Postgres needs the referenced table to exist, so there the key is added at the end.
    fk_name = op.f("fk_agents_current_snapshot_id_snapshots")
    current_fk = (
        [sa.ForeignKeyConstraint(["current_snapshot_id"], ["snapshots.id"], name=fk_name, ondelete="SET NULL")]
        if sqlite
        else []
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fingerprint", sa.String(length=128), nullable=False),
        sa.Column("state_shapes", sa.JSON(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("current_snapshot_id", sa.String(length=32), nullable=True),
        *current_fk,
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
    )
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("parent_id", sa.String(length=32), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("passes", sa.Integer(), nullable=False),
        sa.Column("tokens_consolidated", sa.BigInteger(), nullable=False),
        sa.Column("window_len", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=128), nullable=False),
        sa.Column("byte_size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("format_version", sa.Integer(), nullable=False),
        sa.Column("thread_id", sa.String(length=128), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("payload_path", sa.String(length=200), nullable=True),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_snapshots_seq_positive")),
        sa.CheckConstraint("passes >= 1", name=op.f("ck_snapshots_passes_positive")),
        sa.CheckConstraint("byte_size >= 0", name=op.f("ck_snapshots_byte_size_nonnegative")),
        sa.CheckConstraint("(payload IS NULL) <> (payload_path IS NULL)", name=op.f("ck_snapshots_payload_one_home")),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_snapshots_agent_id_agents"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["snapshots.id"], name=op.f("fk_snapshots_parent_id_snapshots"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_snapshots")),
        sa.UniqueConstraint("agent_id", "seq", name=op.f("uq_snapshots_agent_id_seq")),
    )
    op.create_index(op.f("ix_snapshots_parent_id"), "snapshots", ["parent_id"])
    op.create_index(op.f("ix_snapshots_payload_path"), "snapshots", ["payload_path"])
    if not sqlite:
        op.create_foreign_key(
            op.f("fk_agents_current_snapshot_id_snapshots"),
            "agents",
            "snapshots",
            ["current_snapshot_id"],
            ["id"],
            ondelete="SET NULL",
        )
        # Fast weights are incompressible floats: skip TOAST's compression attempt, store out of line directly.
        op.execute("ALTER TABLE snapshots ALTER COLUMN payload SET STORAGE EXTERNAL")


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint(op.f("fk_agents_current_snapshot_id_snapshots"), "agents", type_="foreignkey")
    op.drop_index(op.f("ix_snapshots_payload_path"), table_name="snapshots")
    op.drop_index(op.f("ix_snapshots_parent_id"), table_name="snapshots")
    op.drop_table("snapshots")
    op.drop_table("agents")
