"""The tables: `ops_job`, `ops_job_step` and the append-only `ops_job_event`.

PostgreSQL is the source of truth for every job; Redis only carries job ids to the workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class JobStatus(StrEnum):
    # Recorded and holding its target, never delivered to a worker until enough approvals make it pending.
    AWAITING_APPROVAL = "awaiting_approval"
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Refused by an approver, or not approved in time: it never ran.
    REJECTED = "rejected"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.REJECTED)


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class EventKind(StrEnum):
    CREATED = "created"
    CLAIMED = "claimed"
    STEP = "step"
    PROGRESS = "progress"
    RELEASED = "released"
    REDELIVERED = "redelivered"
    CANCEL_REQUESTED = "cancel_requested"
    RETRIED = "retried"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVED = "approved"
    REJECTED = "rejected"
    FINISHED = "finished"


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


def _tz() -> DateTime:
    return DateTime(timezone=True)


def _one_of(values: Iterable[StrEnum]) -> str:
    return "status IN (" + ", ".join(f"'{v.value}'" for v in values) + ")"


# The statuses of a job that is not finished: at most one such job per target.
ACTIVE = (JobStatus.AWAITING_APPROVAL, JobStatus.PENDING, JobStatus.RUNNING)
_ACTIVE = text(_one_of(ACTIVE))
# The statuses of a job that a worker should be running (the reaper's scan); an approval's wait is the reaper's too,
# by its own deadline and index.
RUNNABLE = (JobStatus.PENDING, JobStatus.RUNNING)
_RUNNABLE = text(_one_of(RUNNABLE))
# The unique index that finds a target busy; its name is what the driver reports on a violation.
ACTIVE_TARGET_INDEX = "uq_ops_job_active_target"


class Job(Base):
    __tablename__ = "ops_job"

    job_id: Mapped[str] = mapped_column(Text, primary_key=True)
    type: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # What the job's steps learned and later steps (maybe on another worker) compare against; see ctx.remember.
    state: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    target: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    # The team of the key that submitted it: every read and action of a key is confined to its team's jobs.
    team: Mapped[str] = mapped_column(Text, server_default=text("'default'"))
    source_ip: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    # Incremented by every claim; a worker's writes are fenced on (attempt, lease_owner).
    attempt: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(_tz())
    cancel_requested_at: Mapped[datetime | None] = mapped_column(_tz())
    # Under an approval policy: how many approvals it needs, how many it has, and until when (the database's clock)
    # it may get them; after that the reaper rejects it.
    approvals_required: Mapped[int | None] = mapped_column(Integer)
    approvals_given: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    approval_expires_at: Mapped[datetime | None] = mapped_column(_tz())
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_tz(), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(_tz())
    finished_at: Mapped[datetime | None] = mapped_column(_tz())

    __table_args__ = (
        CheckConstraint(_one_of(JobStatus), name="status"),
        # Keyset pagination, newest first, optionally filtered by one column.
        Index("ix_ops_job_created_at_job_id", "created_at", "job_id"),
        Index("ix_ops_job_type_created_at", "type", "created_at", "job_id"),
        Index("ix_ops_job_status_created_at", "status", "created_at", "job_id"),
        Index("ix_ops_job_actor_created_at", "actor", "created_at", "job_id"),
        Index("ix_ops_job_team_created_at", "team", "created_at", "job_id"),
        Index("ix_ops_job_target_created_at", "target", "created_at", "job_id"),
        # At most one pending or running job per target: PostgreSQL enforces it across API replicas.
        Index(ACTIVE_TARGET_INDEX, "target", unique=True, postgresql_where=_ACTIVE),
        # An Idempotency-Key names one job per actor of a team (keys older than the replay window are cleared on
        # reuse). Two teams may each have a key of the same name.
        Index(
            "uq_ops_job_team_actor_idempotency_key",
            "team",
            "actor",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        # The reaper's scan of unfinished jobs. Not on lease_expires_at, so lease renewals stay HOT updates.
        Index("ix_ops_job_active_created_at", "created_at", postgresql_where=_RUNNABLE),
        # The reaper's scan of approvals past their deadline.
        Index(
            "ix_ops_job_approval_expires_at",
            "approval_expires_at",
            postgresql_where=text(f"status = '{JobStatus.AWAITING_APPROVAL.value}'"),
        ),
    )


class Step(Base):
    __tablename__ = "ops_job_step"

    job_id: Mapped[str] = mapped_column(Text, ForeignKey("ops_job.job_id", ondelete="CASCADE"), primary_key=True)
    step_order: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    started_at: Mapped[datetime | None] = mapped_column(_tz())
    finished_at: Mapped[datetime | None] = mapped_column(_tz())

    __table_args__ = (CheckConstraint(_one_of(StepStatus), name="status"),)


class Event(Base):
    __tablename__ = "ops_job_event"

    event_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(Text, ForeignKey("ops_job.job_id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(Text)
    step: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str | None] = mapped_column(Text)
    source_ip: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_tz(), server_default=func.now())

    __table_args__ = (Index("ix_ops_job_event_job_id_event_id", "job_id", "event_id"),)


class ApiKey(Base):
    """An API key managed at run time (`/ops/keys`): only its SHA-256 is kept. Keys from the environment are not
    here; both kinds are checked by the API."""

    __tablename__ = "ops_api_key"

    key_id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    team: Mapped[str] = mapped_column(Text)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    # Glob patterns over the targets it may act on; NULL: any.
    targets: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    sha256: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    created_at: Mapped[datetime] = mapped_column(_tz(), server_default=func.now())
    created_by: Mapped[str] = mapped_column(Text)
    created_from: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime | None] = mapped_column(_tz())
    revoked_at: Mapped[datetime | None] = mapped_column(_tz())
    revoked_by: Mapped[str | None] = mapped_column(Text)
    revoked_from: Mapped[str | None] = mapped_column(Text)
    last_used_at: Mapped[datetime | None] = mapped_column(_tz())

    __table_args__ = (CheckConstraint("cardinality(scopes) > 0", name="scopes"),)


class Approval(Base):
    """One approver's vote for a job awaiting approval: who, from where, when and why. One vote per approver and
    job; a retry that needs approval again starts from none (the votes stay in the job's history)."""

    __tablename__ = "ops_job_approval"

    job_id: Mapped[str] = mapped_column(Text, ForeignKey("ops_job.job_id", ondelete="CASCADE"), primary_key=True)
    # The approver: a key's name within its team (two teams may each have a key of the same name).
    team: Mapped[str] = mapped_column(Text, primary_key=True)
    approver: Mapped[str] = mapped_column(Text, primary_key=True)
    source_ip: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_tz(), server_default=func.now())
