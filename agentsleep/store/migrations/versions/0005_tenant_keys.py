"""Tenants: an agent's key in the store becomes ``tenant + "\\x1f" + agent id`` outside the default tenant
(`agentsleep.ids.agent_key`), so the agent-key columns grow from 128 to ``KEY_LEN`` (193) characters on Postgres.

Existing agents keep their keys: they are the default tenant's agents, as they were every store user's before. No
row is rewritten. SQLite does not enforce varchar lengths, and widening there would rebuild ``agents`` (whose
rebuild fires the ON DELETE CASCADE of every snapshot), so on SQLite this revision changes nothing.

Downgrade narrows the columns back; it refuses while any tenant's agent is stored (the older code would show its
key, separator and all, as an agent id of the default tenant: tenants would see each other's agents).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from agentsleep.errors import StoreError
from agentsleep.ids import KEY_LEN, TENANT_SEP

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_LEN = 128
_COLUMNS = (("agents", "id"), ("snapshots", "agent_id"))


def _resize(length: int, old: int) -> None:
    for table, column in _COLUMNS:
        # varchar -> wider varchar: Postgres keeps the data, the index and the foreign key (same type family).
        op.alter_column(table, column, type_=sa.String(length), existing_type=sa.String(old), existing_nullable=False)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _resize(KEY_LEN, _OLD_LEN)


def downgrade() -> None:
    bind = op.get_bind()
    n = bind.execute(
        sa.text("SELECT count(*) FROM agents WHERE strpos(id, :sep) > 0" if bind.dialect.name == "postgresql"
                else "SELECT count(*) FROM agents WHERE instr(id, :sep) > 0"),
        {"sep": TENANT_SEP},
    ).scalar_one()  # fmt: skip
    if n:
        raise StoreError(
            f"cannot downgrade below 0005: {n} agents belong to tenants, which older versions would show to everyone "
            "(delete or export them first)"
        )
    if bind.dialect.name == "postgresql":
        _resize(_OLD_LEN, KEY_LEN)
