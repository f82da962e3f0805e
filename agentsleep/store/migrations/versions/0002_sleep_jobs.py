"""Sleep jobs claimed by workers (FOR UPDATE SKIP LOCKED on Postgres).

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sleep_jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result_snapshot_id", sa.String(length=32), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'failed')", name=op.f("ck_sleep_jobs_status_known")
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_sleep_jobs_agent_id_agents"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["result_snapshot_id"],
            ["snapshots.id"],
            name=op.f("fk_sleep_jobs_result_snapshot_id_snapshots"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sleep_jobs")),
    )
    op.create_index(op.f("ix_sleep_jobs_agent_id"), "sleep_jobs", ["agent_id"])
    op.create_index("ix_sleep_jobs_status_id", "sleep_jobs", ["status", "id"])


def downgrade() -> None:
    op.drop_index("ix_sleep_jobs_status_id", table_name="sleep_jobs")
    op.drop_index(op.f("ix_sleep_jobs_agent_id"), table_name="sleep_jobs")
    op.drop_table("sleep_jobs")
