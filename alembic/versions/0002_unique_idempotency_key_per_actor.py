"""An Idempotency-Key names at most one job per actor.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 19:26:24.012341
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "uq_ops_job_actor_idempotency_key",
        "ops_job",
        ["actor", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_ops_job_actor_idempotency_key",
        table_name="ops_job",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
