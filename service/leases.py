"""A worker's hold on a job: claim, renew, release, and every write it makes while it runs the job.

A claim bumps `ops_job.attempt`; `(attempt, lease_owner)` is the fencing token. Every write starts by locking
the job row `FOR SHARE` on that token, so once another worker has taken the job over (a claim is an UPDATE of
that row, which waits for or invalidates the lock), nothing the old worker does can change the job any more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import Sessions
from service.models import Event, EventKind, Job, JobStatus, Step, StepStatus


class LeaseLost(Exception):
    """Another worker owns the job now (or it was finished elsewhere): stop touching it."""


@dataclass(frozen=True)
class StepRow:
    order: int
    name: str
    status: StepStatus
    attempts: int
    detail: str | None


@dataclass(frozen=True)
class Lease:
    """The fencing token of one claim, and what the claim read of the job."""

    job_id: str
    owner: str
    attempt: int
    type: str
    params: dict[str, Any]
    steps: tuple[StepRow, ...]


class Leases:
    """All the worker's SQL; one short transaction per transition so progress is visible at once."""

    def __init__(self, sessions: Sessions, owner: str, ttl_s: float) -> None:
        self._sessions = sessions
        self.owner = owner
        self._ttl = timedelta(seconds=ttl_s)

    async def claim(self, job_id: str) -> Lease | None:
        """Take a pending job, or a running one whose lease expired; None when someone else holds it or it ended."""
        async with self._sessions.begin() as session:
            row = (
                await session.execute(
                    update(Job)
                    .where(
                        Job.job_id == job_id,
                        or_(
                            Job.status == JobStatus.PENDING,
                            (Job.status == JobStatus.RUNNING) & (Job.lease_expires_at < func.now()),
                        ),
                    )
                    .values(
                        status=JobStatus.RUNNING,
                        attempt=Job.attempt + 1,
                        lease_owner=self.owner,
                        lease_expires_at=func.now() + self._ttl,
                        started_at=func.coalesce(Job.started_at, func.now()),
                    )
                    .returning(Job.attempt, Job.type, Job.params)
                )
            ).one_or_none()
            if row is None:
                return None
            steps = await session.execute(
                select(Step.step_order, Step.name, Step.status, Step.attempts, Step.detail)
                .where(Step.job_id == job_id)
                .order_by(Step.step_order)
            )
            lease = Lease(
                job_id=job_id,
                owner=self.owner,
                attempt=row.attempt,
                type=row.type,
                params=row.params,
                steps=tuple(StepRow(s.step_order, s.name, StepStatus(s.status), s.attempts, s.detail) for s in steps),
            )
            await _event(session, lease, EventKind.CLAIMED, status=JobStatus.RUNNING, detail=f"by {self.owner}")
            return lease

    @asynccontextmanager
    async def _fenced(self, lease: Lease) -> AsyncIterator[AsyncSession]:
        async with self._sessions.begin() as session:
            held = await session.scalar(
                select(Job.job_id)
                .where(
                    Job.job_id == lease.job_id,
                    Job.attempt == lease.attempt,
                    Job.lease_owner == lease.owner,
                    Job.status == JobStatus.RUNNING,
                )
                .with_for_update(read=True)
            )
            if held is None:
                raise LeaseLost(f"job {lease.job_id} attempt {lease.attempt} is no longer held by {lease.owner}")
            yield session

    async def renew(self, lease: Lease) -> None:
        async with self._fenced(lease) as session:
            await session.execute(
                update(Job).where(Job.job_id == lease.job_id).values(lease_expires_at=func.now() + self._ttl)
            )

    async def release(self, lease: Lease, reason: str) -> None:
        """Give the job back (worker shutting down): pending again, so any worker may claim it at once."""
        async with self._fenced(lease) as session:
            await session.execute(
                update(Job)
                .where(Job.job_id == lease.job_id)
                .values(status=JobStatus.PENDING, lease_owner=None, lease_expires_at=None)
            )
            await session.execute(
                update(Step)
                .where(Step.job_id == lease.job_id, Step.status == StepStatus.RUNNING)
                .values(status=StepStatus.PENDING, detail=reason)
            )
            await _event(session, lease, EventKind.RELEASED, status=JobStatus.PENDING, detail=reason)

    async def start_step(self, lease: Lease, step: StepRow) -> None:
        async with self._fenced(lease) as session:
            await session.execute(
                _step_update(lease, step).values(
                    status=StepStatus.RUNNING, attempts=Step.attempts + 1, started_at=func.now(), finished_at=None
                )
            )
            await _event(session, lease, EventKind.STEP, step=step.name, status=StepStatus.RUNNING)

    async def progress(self, lease: Lease, step: StepRow, detail: str) -> None:
        async with self._fenced(lease) as session:
            await session.execute(_step_update(lease, step).values(detail=detail))
            await _event(session, lease, EventKind.PROGRESS, step=step.name, detail=detail)

    async def finish_step(self, lease: Lease, step: StepRow, status: StepStatus, detail: str | None) -> None:
        async with self._fenced(lease) as session:
            values: dict[str, Any] = {"status": status, "finished_at": func.now()}
            if detail is not None:
                values["detail"] = detail
            await session.execute(_step_update(lease, step).values(**values))
            await _event(session, lease, EventKind.STEP, step=step.name, status=status, detail=detail)

    async def finish_job(self, lease: Lease, status: JobStatus, error: str | None = None) -> None:
        async with self._fenced(lease) as session:
            await session.execute(
                update(Job)
                .where(Job.job_id == lease.job_id)
                .values(status=status, error=error, finished_at=func.now(), lease_owner=None, lease_expires_at=None)
            )
            await _event(session, lease, EventKind.FINISHED, status=status, detail=error)


async def due_for_delivery(sessions: Sessions, pending_after_s: float, limit: int) -> list[tuple[str, int]]:
    """(job_id, attempt) of jobs that need a delivery: pending for a while (maybe never enqueued), or running
    on an expired lease (its worker died). Oldest first."""
    async with sessions() as session:
        rows = await session.execute(
            select(Job.job_id, Job.attempt)
            .where(
                Job.status.in_([JobStatus.PENDING, JobStatus.RUNNING]),
                or_(
                    (Job.status == JobStatus.PENDING)
                    & (Job.created_at < func.now() - timedelta(seconds=pending_after_s)),
                    (Job.status == JobStatus.RUNNING) & (Job.lease_expires_at < func.now()),
                ),
            )
            .order_by(Job.created_at)
            .limit(limit)
        )
        return [(row.job_id, row.attempt) for row in rows]


def _step_update(lease: Lease, step: StepRow) -> Any:
    return update(Step).where(Step.job_id == lease.job_id, Step.step_order == step.order)


async def _event(
    session: AsyncSession,
    lease: Lease,
    kind: EventKind,
    *,
    step: str | None = None,
    status: str | None = None,
    detail: str | None = None,
) -> None:
    await session.execute(
        insert(Event).values(
            job_id=lease.job_id,
            kind=kind,
            step=step,
            status=status,
            detail=detail,
            attempt=lease.attempt,
            actor=f"worker:{lease.owner}",
        )
    )
