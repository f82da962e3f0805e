"""Sleep jobs move to procrastinate: drop the hand-made ``sleep_jobs`` table; on Postgres, install procrastinate's
schema (its tables, types and functions) in the store's schema, unless it is already there.

Jobs still pending in ``sleep_jobs`` are dropped with it: a sleep job carries no data (it consolidates whatever
window the agent has when it runs), so enqueue again what should still run.

procrastinate's schema belongs to its version (pinned in pyproject.toml): upgrading procrastinate means a new
revision here that applies its SQL migrations (``procrastinate/sql/migrations``) between the two versions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-02-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from agentsleep.store.jobs import drop_procrastinate_schema, install_procrastinate_schema

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_sleep_jobs_status_id", table_name="sleep_jobs")
    op.drop_index(op.f("ix_sleep_jobs_agent_id"), table_name="sleep_jobs")
    op.drop_table("sleep_jobs")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        install_procrastinate_schema(bind)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        drop_procrastinate_schema(bind)
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
