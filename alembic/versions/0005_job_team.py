"""Teams: every job belongs to the team of the key that submitted it; an Idempotency-Key is per team and actor.

Jobs submitted before teams existed belong to the team `default`, as keys configured without a team do.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 23:55:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYED = sa.text("idempotency_key IS NOT NULL")


def upgrade() -> None:
    # A constant default: PostgreSQL adds the column without rewriting the table.
    op.add_column("ops_job", sa.Column("team", sa.Text(), server_default=sa.text("'default'"), nullable=False))
    op.create_index("ix_ops_job_team_created_at", "ops_job", ["team", "created_at", "job_id"])
    op.create_index(
        "uq_ops_job_team_actor_idempotency_key",
        "ops_job",
        ["team", "actor", "idempotency_key"],
        unique=True,
        postgresql_where=_KEYED,
    )
    op.drop_index("uq_ops_job_actor_idempotency_key", table_name="ops_job", postgresql_where=_KEYED)


def downgrade() -> None:
    # Fails if two teams' keys of the same name used the same Idempotency-Key: that history cannot go back.
    op.create_index(
        "uq_ops_job_actor_idempotency_key",
        "ops_job",
        ["actor", "idempotency_key"],
        unique=True,
        postgresql_where=_KEYED,
    )
    op.drop_index("uq_ops_job_team_actor_idempotency_key", table_name="ops_job", postgresql_where=_KEYED)
    op.drop_index("ix_ops_job_team_created_at", table_name="ops_job")
    op.drop_column("ops_job", "team")
