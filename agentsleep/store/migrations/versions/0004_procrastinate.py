"""Sleep jobs move to procrastinate: drop the hand-made ``sleep_jobs`` table; on Postgres, install procrastinate's
schema (its tables, types and functions) in the store's schema, unless it is already there.

Jobs still waiting in ``sleep_jobs`` (pending, or running under a 0.1.0 worker that the upgrade stops) are carried
over on Postgres: each becomes a procrastinate job on its agent's queue (with its ``passes``), so a queued sleep
survives the upgrade. SQLite stores have no sleep workers any more (the host sleeps its agents in process), so there
they are dropped with a warning naming the agents; nothing of the agents' memory is lost (a sleep job carries no
data: it consolidates whatever window the agent has when it runs).

procrastinate's schema belongs to its version (pinned in pyproject.toml): upgrading procrastinate means a new
revision here that applies its SQL migrations (``procrastinate/sql/migrations``) between the two versions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-02-02
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

from agentsleep.store.jobs import defer_sleep, drop_procrastinate_schema, install_procrastinate_schema

log = logging.getLogger("agentsleep.store.migrations")

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _waiting_jobs(bind: sa.Connection) -> list[tuple[str, str, int | None]]:
    """(agent id, agent fingerprint, passes) of every job that had not finished, oldest first."""
    rows = bind.execute(
        sa.text(
            "SELECT j.agent_id, a.fingerprint, j.params FROM sleep_jobs j JOIN agents a ON a.id = j.agent_id "
            "WHERE j.status IN ('pending', 'running') ORDER BY j.id"
        )
    ).all()
    out = []
    for agent_id, fingerprint, params in rows:
        if isinstance(params, str):  # SQLite hands JSON back as text
            params = json.loads(params) if params else None
        passes = params.get("passes") if isinstance(params, dict) else None
        ok = isinstance(passes, int) and not isinstance(passes, bool) and passes >= 1
        out.append((agent_id, fingerprint, passes if ok else None))
    return out


def upgrade() -> None:
    bind = op.get_bind()
    waiting = _waiting_jobs(bind)
    op.drop_index("ix_sleep_jobs_status_id", table_name="sleep_jobs")
    op.drop_index(op.f("ix_sleep_jobs_agent_id"), table_name="sleep_jobs")
    op.drop_table("sleep_jobs")
    if bind.dialect.name == "postgresql":
        install_procrastinate_schema(bind)
        with Session(bind=bind) as s:  # joins the migration's transaction
            for agent_id, fingerprint, passes in waiting:
                defer_sleep(s, agent_id, fingerprint, passes)
        if waiting:
            log.info("carried %d waiting sleep jobs over to procrastinate", len(waiting))
    elif waiting:
        log.warning(
            "dropped %d waiting sleep jobs (agents %s): SQLite stores have no sleep workers any more; the host sleeps "
            "these agents in process when their windows fill (their memory is intact)",
            len(waiting),
            sorted({a for a, _, _ in waiting}),
        )


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
