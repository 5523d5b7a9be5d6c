"""The two-person rule: a job under an approval policy waits in `awaiting_approval` until enough people of its
team, other than the one who asked, approve it (then it is pending and runs), or one rejects it, or its time runs
out (the worker's reaper then rejects it).

Each decision is one statement that locks the job's row first: two approvers at once are serialised on it, and the
second sees the first's vote in the row it locks (`approvals_given`), so exactly one of them makes the job pending;
an approval racing a cancel or a rejection finds the job no longer awaiting approval. Every vote is a row of
`ops_job_approval` (one per approver, which is what refuses a second vote) and an event of the job's history.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from service.api.repository import Caller, caller_columns, job_as_left
from service.api.schemas import JobOut
from service.errors import Conflict, Forbidden, NotFound
from service.models import EventKind, JobStatus

# The job's row, locked, as the caller may see it (`only_team`: NULL for the service's operators).
_LOCKED_JOB = """
job AS (
    SELECT job_id, actor, team, status, approvals_required, approvals_given, approval_expires_at,
        coalesce(approval_expires_at <= now(), false) AS expired
    FROM ops_job
    WHERE job_id = :job_id AND (team = CAST(:only_team AS text) OR CAST(:only_team AS text) IS NULL)
    FOR UPDATE
)"""
_APPROVE = text(f"""
WITH {_LOCKED_JOB},
go AS (
    SELECT job_id, approvals_given + 1 AS given, approvals_required FROM job
    WHERE status = '{JobStatus.AWAITING_APPROVAL}' AND NOT expired AND NOT (actor = :actor AND team = :team)
),
vote AS (
    INSERT INTO ops_job_approval (job_id, team, approver, source_ip, reason)
    SELECT job_id, :team, :actor, :source_ip, :reason FROM go
    ON CONFLICT DO NOTHING
    RETURNING job_id
),
counted AS (
    UPDATE ops_job SET approvals_given = go.given,
        status = CASE WHEN go.given >= go.approvals_required THEN '{JobStatus.PENDING}' ELSE ops_job.status END
    FROM go, vote
    WHERE ops_job.job_id = go.job_id
    RETURNING ops_job.job_id, ops_job.status
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, status, detail, actor, source_ip)
    SELECT counted.job_id, '{EventKind.APPROVED}', counted.status,
        format('approval %s of %s', go.given, go.approvals_required) || coalesce(': ' || :reason, ''),
        :actor, :source_ip
    FROM counted, go
    RETURNING 1
)
SELECT actor, team, status, expired, approval_expires_at, EXISTS (SELECT 1 FROM go) AS eligible,
    EXISTS (SELECT 1 FROM vote) AS voted, (SELECT status FROM counted) AS now
FROM job
""")
_REJECT = text(f"""
WITH {_LOCKED_JOB},
go AS (SELECT job_id FROM job WHERE status = '{JobStatus.AWAITING_APPROVAL}'),
rejected AS (
    UPDATE ops_job SET status = '{JobStatus.REJECTED}', finished_at = now(), error = :error
    FROM go
    WHERE ops_job.job_id = go.job_id
    RETURNING ops_job.job_id
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, status, detail, actor, source_ip)
    SELECT rejected.job_id, e.kind, '{JobStatus.REJECTED}', e.detail, :actor, :source_ip
    FROM rejected, LATERAL (VALUES
        (1, '{EventKind.REJECTED}', CAST(:reason AS text)),
        (2, '{EventKind.FINISHED}', NULL)
    ) AS e (n, kind, detail)
    ORDER BY e.n
    RETURNING 1
)
SELECT status, EXISTS (SELECT 1 FROM go) AS done FROM job
""")


class Approve(BaseModel):
    """`POST /ops/jobs/{id}/approve`: why, optionally."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=1, max_length=1000)] | None = None


class Reject(BaseModel):
    """`POST /ops/jobs/{id}/reject`: why, always."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=1, max_length=1000)]


async def approve_job(conn: AsyncConnection, job_id: str, caller: Caller, approval: Approve) -> JobOut:
    """One vote for a job awaiting approval; with enough, the job is pending (the caller enqueues it)."""
    values = {"job_id": job_id, "reason": approval.reason, **caller_columns(caller)}
    row = (await conn.execute(_APPROVE, values)).one_or_none()
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    if row.status != JobStatus.AWAITING_APPROVAL:
        raise Conflict(
            f"job {job_id} is {row.status}, not awaiting approval; there is nothing to approve",
            details={"status": row.status},
        )
    if row.expired:
        raise Conflict(
            f"the approval of job {job_id} expired at {row.approval_expires_at.isoformat()}; it can no longer be "
            "approved (submit it again)",
            details={"status": row.status, "approval_expires_at": row.approval_expires_at.isoformat()},
        )
    if not row.eligible:
        raise Forbidden(
            f"{caller.actor!r} submitted job {job_id}; its approval must come from someone else",
            details={"requester": row.actor},
        )
    if not row.voted:
        raise Conflict(f"{caller.actor!r} has already approved job {job_id}; each person approves once")
    return await job_as_left(conn, job_id)


async def reject_job(conn: AsyncConnection, job_id: str, caller: Caller, rejection: Reject) -> JobOut:
    """End a job awaiting approval as `rejected`; it never runs."""
    error = f"rejected by {caller.actor}: {rejection.reason}"
    values = {"job_id": job_id, "reason": rejection.reason, "error": error, **caller_columns(caller)}
    row = (await conn.execute(_REJECT, values)).one_or_none()
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    if not row.done:
        raise Conflict(
            f"job {job_id} is {row.status}, not awaiting approval; there is nothing to reject",
            details={"status": row.status},
        )
    return await job_as_left(conn, job_id)
