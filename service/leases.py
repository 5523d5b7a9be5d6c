"""A worker's hold on a job: claim, renew, release, and every write it makes while it runs the job.

A claim bumps `ops_job.attempt`; `(attempt, lease_owner)` is the fencing token. Every write starts by locking
the job row `FOR SHARE` on that token, so once another worker has taken the job over (a claim is an UPDATE of
that row, which waits for or invalidates the lock), nothing the old worker does can change the job any more.

Writes survive short PostgreSQL outages: a connection failure is retried with backoff for as long as the lease
could still be ours (its TTL), then the job is given up as lost and the reaper resumes it once PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import Sessions, database_unavailable
from service.models import Event, EventKind, Job, JobStatus, Step, StepStatus

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker owns the job now (or it was finished elsewhere): stop touching it."""


class CancelRequested(Exception):
    """Someone asked for the job to stop; the message says who."""


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
    state: dict[str, Any]
    # The worker whose expired lease this claim took over; None for a first or handed-back claim.
    previous_owner: str | None = None


Work = Callable[[AsyncSession], Awaitable[None]]


class Leases:
    """All the worker's SQL; one short transaction per transition so progress is visible at once."""

    def __init__(self, sessions: Sessions, owner: str, ttl_s: float) -> None:
        self._sessions = sessions
        self.owner = owner
        self._ttl_s = ttl_s
        self._ttl = timedelta(seconds=ttl_s)

    async def claim(self, job_id: str) -> Lease | None:
        """Take a pending job, or a running one whose lease expired; None when someone else holds it or it ended."""
        previous = select(Job.lease_owner).where(Job.job_id == job_id).scalar_subquery()
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
                    .returning(Job.attempt, Job.type, Job.params, Job.state, previous.label("previous_owner"))
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
                state=row.state,
                previous_owner=row.previous_owner,
            )
            detail = f"by {self.owner}"
            if row.previous_owner:
                detail += f"; took over from {row.previous_owner}, whose lease expired"
            await _event(session, lease, EventKind.CLAIMED, status=JobStatus.RUNNING, detail=detail)
            return lease

    @asynccontextmanager
    async def _fenced(self, lease: Lease, check_cancel: bool) -> AsyncIterator[AsyncSession]:
        async with self._sessions.begin() as session:
            held = (
                await session.execute(
                    select(Job.cancel_requested_at)
                    .where(
                        Job.job_id == lease.job_id,
                        Job.attempt == lease.attempt,
                        Job.lease_owner == lease.owner,
                        Job.status == JobStatus.RUNNING,
                    )
                    .with_for_update(read=True)
                )
            ).one_or_none()
            if held is None:
                raise LeaseLost(f"job {lease.job_id} attempt {lease.attempt} is no longer held by {lease.owner}")
            if check_cancel and held.cancel_requested_at is not None:
                raise CancelRequested(await _cancel_reason(session, lease.job_id, held.cancel_requested_at))
            yield session

    async def _write(self, lease: Lease, work: Work, check_cancel: bool = False) -> None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._ttl_s
        delay = 0.1
        while True:
            try:
                async with self._fenced(lease, check_cancel) as session:
                    await work(session)
                return
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                if loop.time() + delay >= give_up_at:
                    raise LeaseLost(f"PostgreSQL unreachable for {self._ttl_s:g}s: {exc}") from exc
                logger.warning("PostgreSQL unreachable, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def check(self, lease: Lease) -> None:
        """Raises LeaseLost or CancelRequested; writes nothing."""
        async with self._fenced(lease, check_cancel=True):
            pass

    async def renew(self, lease: Lease) -> None:
        async def work(session: AsyncSession) -> None:
            await session.execute(
                update(Job).where(Job.job_id == lease.job_id).values(lease_expires_at=func.now() + self._ttl)
            )

        await self._write(lease, work, check_cancel=True)

    async def release(self, lease: Lease, reason: str) -> None:
        """Give the job back (worker stopping): pending again, so any worker may claim it at once; the step that
        was running is pending again and will run again."""

        async def work(session: AsyncSession) -> None:
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

        await self._write(lease, work)

    async def start_step(self, lease: Lease, step: StepRow) -> None:
        """Checks for a cancel request first: a cancelled job never starts another step."""

        async def work(session: AsyncSession) -> None:
            await session.execute(
                _step_update(lease, step).values(
                    status=StepStatus.RUNNING, attempts=Step.attempts + 1, started_at=func.now(), finished_at=None
                )
            )
            await _event(session, lease, EventKind.STEP, step=step.name, status=StepStatus.RUNNING)

        await self._write(lease, work, check_cancel=True)

    async def remember(self, lease: Lease, values: dict[str, Any]) -> None:
        """Merge `values` into the job's state (JSONB `||`), for later steps and for a resumed run."""

        async def work(session: AsyncSession) -> None:
            merged = Job.state.op("||")(sa.bindparam("remembered", values, type_=JSONB))
            await session.execute(update(Job).where(Job.job_id == lease.job_id).values(state=merged))

        await self._write(lease, work)

    async def progress(self, lease: Lease, step: StepRow, detail: str) -> None:
        async def work(session: AsyncSession) -> None:
            await session.execute(_step_update(lease, step).values(detail=detail))
            await _event(session, lease, EventKind.PROGRESS, step=step.name, detail=detail)

        await self._write(lease, work)

    async def finish_step(self, lease: Lease, step: StepRow, status: StepStatus, detail: str | None) -> None:
        values: dict[str, Any] = {"status": status, "finished_at": func.now()}
        if detail is not None:
            values["detail"] = detail

        async def work(session: AsyncSession) -> None:
            await session.execute(_step_update(lease, step).values(**values))
            await _event(session, lease, EventKind.STEP, step=step.name, status=status, detail=detail)

        await self._write(lease, work)

    async def finish_job(self, lease: Lease, status: JobStatus, error: str | None = None) -> None:
        async def work(session: AsyncSession) -> None:
            await session.execute(
                update(Job)
                .where(Job.job_id == lease.job_id)
                .values(status=status, error=error, finished_at=func.now(), lease_owner=None, lease_expires_at=None)
            )
            await _event(session, lease, EventKind.FINISHED, status=status, detail=error)

        await self._write(lease, work)


@dataclass(frozen=True)
class Due:
    job_id: str
    attempt: int
    status: JobStatus
    lease_owner: str | None
    # How long it has been due: since it was created (pending) or since its lease expired (running).
    waited_s: float


async def due_for_delivery(sessions: Sessions, pending_after_s: float, limit: int) -> list[Due]:
    """Jobs that need a delivery: pending for a while (maybe never enqueued), or running on an expired lease
    (their worker died). Oldest first."""
    async with sessions() as session:
        rows = await session.execute(
            select(
                Job.job_id,
                Job.attempt,
                Job.status,
                Job.lease_owner,
                func.extract("epoch", func.now() - func.coalesce(Job.lease_expires_at, Job.created_at)).label(
                    "waited_s"
                ),
            )
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
        return [
            Due(row.job_id, row.attempt, JobStatus(row.status), row.lease_owner, float(row.waited_s)) for row in rows
        ]


async def record_redelivered(sessions: Sessions, delivered: list[Due], reaper: str) -> None:
    """History for jobs the reaper put back on the queue (arq's dedupe makes repeats no-ops, so no repeats here)."""
    async with sessions.begin() as session:
        await session.execute(
            insert(Event),
            [
                {
                    "job_id": due.job_id,
                    "kind": EventKind.REDELIVERED,
                    "status": due.status,
                    # No attempt: the reaper holds no lease, and its note may land after the next claim's events.
                    "attempt": None,
                    "actor": f"reaper:{reaper}",
                    "detail": f"lease of {due.lease_owner} (attempt {due.attempt}) expired"
                    if due.status == JobStatus.RUNNING
                    else "pending and not in the queue",
                }
                for due in delivered
            ],
        )


async def _cancel_reason(session: AsyncSession, job_id: str, requested_at: datetime) -> str:
    actor = await session.scalar(
        select(Event.actor)
        .where(Event.job_id == job_id, Event.kind == EventKind.CANCEL_REQUESTED)
        .order_by(Event.event_id.desc())
        .limit(1)
    )
    return f"cancelled by {actor or 'an operator'} at {requested_at.isoformat(timespec='seconds')}"


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
