"""Jobs, their steps and their events.

Revision ID: 0001
Revises:
Create Date: 2026-11-29 19:11:53.150258
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ops_job",
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("params", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("source_ip", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'success', 'failed', 'cancelled')", name=op.f("ck_ops_job_status")
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_ops_job")),
    )
    op.create_index(
        "ix_ops_job_active_created_at",
        "ops_job",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )
    op.create_index("ix_ops_job_actor_created_at", "ops_job", ["actor", "created_at", "job_id"], unique=False)
    op.create_index("ix_ops_job_created_at_job_id", "ops_job", ["created_at", "job_id"], unique=False)
    op.create_index("ix_ops_job_status_created_at", "ops_job", ["status", "created_at", "job_id"], unique=False)
    op.create_index("ix_ops_job_target_created_at", "ops_job", ["target", "created_at", "job_id"], unique=False)
    op.create_index("ix_ops_job_type_created_at", "ops_job", ["type", "created_at", "job_id"], unique=False)
    op.create_index(
        "uq_ops_job_active_target",
        "ops_job",
        ["target"],
        unique=True,
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )
    op.create_table(
        "ops_job_event",
        sa.Column("event_id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("step", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("actor", sa.Text(), nullable=True),
        sa.Column("source_ip", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["ops_job.job_id"], name=op.f("fk_ops_job_event_job_id_ops_job"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_ops_job_event")),
    )
    op.create_index("ix_ops_job_event_job_id_event_id", "ops_job_event", ["job_id", "event_id"], unique=False)
    op.create_table(
        "ops_job_step",
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("step_order", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'success', 'failed', 'cancelled', 'skipped')",
            name=op.f("ck_ops_job_step_status"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["ops_job.job_id"], name=op.f("fk_ops_job_step_job_id_ops_job"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "step_order", name=op.f("pk_ops_job_step")),
    )


def downgrade() -> None:
    op.drop_table("ops_job_step")
    op.drop_index("ix_ops_job_event_job_id_event_id", table_name="ops_job_event")
    op.drop_table("ops_job_event")
    op.drop_index(
        "uq_ops_job_active_target", table_name="ops_job", postgresql_where=sa.text("status IN ('pending', 'running')")
    )
    op.drop_index("ix_ops_job_type_created_at", table_name="ops_job")
    op.drop_index("ix_ops_job_target_created_at", table_name="ops_job")
    op.drop_index("ix_ops_job_status_created_at", table_name="ops_job")
    op.drop_index("ix_ops_job_created_at_job_id", table_name="ops_job")
    op.drop_index("ix_ops_job_actor_created_at", table_name="ops_job")
    op.drop_index(
        "ix_ops_job_active_created_at",
        table_name="ops_job",
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )
    op.drop_table("ops_job")
