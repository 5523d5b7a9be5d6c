"""Approvals: a job under an approval policy waits in `awaiting_approval` (holding its target) for its votes, or
ends `rejected`; each vote is a row of `ops_job_approval`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 00:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = "'pending', 'running', 'success', 'failed', 'cancelled'"
_WITH_APPROVALS = f"'awaiting_approval', {_STATUSES}, 'rejected'"


def _active_target_index(statuses: str) -> None:
    # Built before the old one is dropped: the rule "one active job per target" holds at every moment.
    op.execute("ALTER INDEX uq_ops_job_active_target RENAME TO uq_ops_job_active_target_old")
    op.create_index(
        "uq_ops_job_active_target",
        "ops_job",
        ["target"],
        unique=True,
        postgresql_where=sa.text(f"status IN ({statuses})"),
    )
    op.drop_index("uq_ops_job_active_target_old", table_name="ops_job")


def upgrade() -> None:
    op.add_column("ops_job", sa.Column("approvals_required", sa.Integer(), nullable=True))
    op.add_column("ops_job", sa.Column("approvals_given", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.add_column("ops_job", sa.Column("approval_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_constraint(op.f("ck_ops_job_status"), "ops_job", type_="check")
    op.create_check_constraint(op.f("ck_ops_job_status"), "ops_job", f"status IN ({_WITH_APPROVALS})")
    _active_target_index("'awaiting_approval', 'pending', 'running'")
    op.create_index(
        "ix_ops_job_approval_expires_at",
        "ops_job",
        ["approval_expires_at"],
        postgresql_where=sa.text("status = 'awaiting_approval'"),
    )
    op.create_table(
        "ops_job_approval",
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("team", sa.Text(), nullable=False),
        sa.Column("approver", sa.Text(), nullable=False),
        sa.Column("source_ip", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["ops_job.job_id"], name=op.f("fk_ops_job_approval_job_id_ops_job"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "team", "approver", name=op.f("pk_ops_job_approval")),
    )


def downgrade() -> None:
    # Fails while a job awaits approval or was rejected: decide those first (approve, reject or cancel them).
    op.drop_table("ops_job_approval")
    op.drop_index("ix_ops_job_approval_expires_at", table_name="ops_job")
    _active_target_index("'pending', 'running'")
    op.drop_constraint(op.f("ck_ops_job_status"), "ops_job", type_="check")
    op.create_check_constraint(op.f("ck_ops_job_status"), "ops_job", f"status IN ({_STATUSES})")
    op.drop_column("ops_job", "approval_expires_at")
    op.drop_column("ops_job", "approvals_given")
    op.drop_column("ops_job", "approvals_required")
