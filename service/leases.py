"""A worker's hold on a job: claim, renew, release, and every write it makes while it runs the job.

A claim bumps `ops_job.attempt`; `(attempt, lease_owner)` is the fencing token. Every write starts by locking
the job row `FOR SHARE` on that token, so once another worker has taken the job over (a claim is an UPDATE of
that row, which waits for or invalidates the lock), nothing the old worker does can change the job any more.

Writes survive short PostgreSQL outages: a connection failure is retried with backoff for as long as the lease
could still be ours (its TTL), then the job is given up as lost and the reaper resumes it once PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import TextClause, func, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

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


class Leases:
    """All the worker's SQL; one short transaction per transition so progress is visible at once."""

    def __init__(self, sessions: Sessions, owner: str, ttl_s: float) -> None:
        self._sessions = sessions
        self.owner = owner
        self._ttl_s = ttl_s
        self._ttl = timedelta(seconds=ttl_s)
        # Fenced writes are single statements: in autocommit each is its own transaction, with no BEGIN/COMMIT trips.
        bind = sessions.kw["bind"]
        assert isinstance(bind, AsyncEngine)
        self._autocommit = bind.execution_options(isolation_level="AUTOCOMMIT")

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

    async def _write(self, lease: Lease, statement: TextClause, **params: Any) -> None:
        """Run one fenced write: a single statement, in its own implicit transaction (one round trip)."""
        values = {"job_id": lease.job_id, "attempt": lease.attempt, "owner": lease.owner, **params}
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._ttl_s
        delay = 0.1
        while True:
            try:
                async with self._autocommit.connect() as conn:
                    held, cancel_requested_at = (await conn.execute(statement, values)).one()
                break
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                if loop.time() + delay >= give_up_at:
                    raise LeaseLost(f"PostgreSQL unreachable for {self._ttl_s:g}s: {exc}") from exc
                logger.warning("PostgreSQL unreachable, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if not held:
            raise LeaseLost(f"job {lease.job_id} attempt {lease.attempt} is no longer held by {lease.owner}")
        if cancel_requested_at is not None and statement in _CANCELLABLE:
            async with self._sessions() as session:
                raise CancelRequested(await _cancel_reason(session, lease.job_id, cancel_requested_at))

    def _event(self, lease: Lease, kind: EventKind, step: str | None = None, status: str | None = None,
               detail: str | None = None) -> dict[str, Any]:  # fmt: skip
        return {"kind": kind.value, "ev_step": step, "ev_status": status, "ev_detail": detail,
                "actor": f"worker:{lease.owner}"}  # fmt: skip

    async def check(self, lease: Lease) -> None:
        """Raises LeaseLost or CancelRequested; writes nothing."""
        await self._write(lease, _CHECK)

    async def renew(self, lease: Lease) -> None:
        await self._write(lease, _RENEW, ttl=self._ttl_s)

    async def release(self, lease: Lease, reason: str) -> None:
        """Give the job back (worker stopping): pending again, so any worker may claim it at once; the step that
        was running is pending again and will run again."""
        event = self._event(lease, EventKind.RELEASED, status=JobStatus.PENDING, detail=reason)
        await self._write(lease, _RELEASE, detail=reason, **event)

    async def start_step(self, lease: Lease, step: StepRow) -> None:
        """Checks for a cancel request first: a cancelled job never starts another step."""
        event = self._event(lease, EventKind.STEP, step=step.name, status=StepStatus.RUNNING)
        await self._write(lease, _START_STEP, step_order=step.order, **event)

    async def remember(self, lease: Lease, values: dict[str, Any]) -> None:
        """Merge `values` into the job's state (JSONB `||`), for later steps and for a resumed run."""
        await self._write(lease, _REMEMBER, state=json.dumps(values))

    async def progress(self, lease: Lease, step: StepRow, detail: str) -> None:
        event = self._event(lease, EventKind.PROGRESS, step=step.name, detail=detail)
        await self._write(lease, _PROGRESS, step_order=step.order, detail=detail, **event)

    async def finish_step(self, lease: Lease, step: StepRow, status: StepStatus, detail: str | None) -> None:
        event = self._event(lease, EventKind.STEP, step=step.name, status=status, detail=detail)
        await self._write(lease, _FINISH_STEP, step_order=step.order, step_status=status.value, detail=detail, **event)

    async def finish_job(self, lease: Lease, status: JobStatus, error: str | None = None) -> None:
        event = self._event(lease, EventKind.FINISHED, status=status, detail=error)
        await self._write(lease, _FINISH_JOB, job_status=status.value, error=error, **event)


def _fenced(writes: str = "", check_cancel: bool = False, event: bool = True) -> TextClause:
    """One statement: lock the job row FOR SHARE on the fencing token (a takeover, which UPDATEs that row, waits for
    it or makes it find nothing), make `writes` and the event only if the fence held (and, with `check_cancel`, no
    cancel was requested), and say whether it held and whether a cancel was requested."""
    cancel = "WHERE cancel_requested_at IS NULL" if check_cancel else ""
    event_cte = (
        ", event AS (INSERT INTO ops_job_event (job_id, kind, step, status, detail, attempt, actor)"
        " SELECT :job_id, CAST(:kind AS text), CAST(:ev_step AS text), CAST(:ev_status AS text),"
        " CAST(:ev_detail AS text), CAST(:attempt AS integer), CAST(:actor AS text) FROM go RETURNING 1)"
        if event
        else ""
    )
    return text(
        "WITH fence AS (SELECT cancel_requested_at FROM ops_job WHERE job_id = :job_id"
        " AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner AND status = 'running' FOR SHARE),"
        f" go AS (SELECT 1 FROM fence {cancel}){writes}{event_cte}"
        " SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at"
    )


_IF_HELD = "EXISTS (SELECT 1 FROM go)"
_STEP = f"job_id = :job_id AND step_order = CAST(:step_order AS integer) AND {_IF_HELD}"
_CHECK = _fenced(check_cancel=True, event=False)
_RENEW = _fenced(
    ", job AS (UPDATE ops_job SET lease_expires_at = now() + make_interval(secs => CAST(:ttl AS double precision))"
    f" WHERE job_id = :job_id AND {_IF_HELD} RETURNING 1)",
    check_cancel=True,
    event=False,
)
_RELEASE = _fenced(
    ", job AS (UPDATE ops_job SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL"
    f" WHERE job_id = :job_id AND {_IF_HELD} RETURNING 1),"
    " steps AS (UPDATE ops_job_step SET status = 'pending', detail = CAST(:detail AS text)"
    f" WHERE job_id = :job_id AND status = 'running' AND {_IF_HELD} RETURNING 1)"
)
_START_STEP = _fenced(
    ", step AS (UPDATE ops_job_step SET status = 'running', attempts = attempts + 1, started_at = now(),"
    f" finished_at = NULL WHERE {_STEP} RETURNING 1)",
    check_cancel=True,
)
_REMEMBER = _fenced(
    f", job AS (UPDATE ops_job SET state = state || CAST(:state AS jsonb) WHERE job_id = :job_id AND {_IF_HELD}"
    " RETURNING 1)",
    event=False,
)
_PROGRESS = _fenced(f", step AS (UPDATE ops_job_step SET detail = CAST(:detail AS text) WHERE {_STEP} RETURNING 1)")
_FINISH_STEP = _fenced(
    ", step AS (UPDATE ops_job_step SET status = CAST(:step_status AS text), finished_at = now(),"
    f" detail = coalesce(CAST(:detail AS text), detail) WHERE {_STEP} RETURNING 1)"
)
_FINISH_JOB = _fenced(
    ", job AS (UPDATE ops_job SET status = CAST(:job_status AS text), error = CAST(:error AS text),"
    f" finished_at = now(), lease_owner = NULL, lease_expires_at = NULL WHERE job_id = :job_id AND {_IF_HELD}"
    " RETURNING 1)"
)
# Writes that must not happen once a cancel is requested; the others record the cancel itself, or a hand-back.
_CANCELLABLE = (_CHECK, _RENEW, _START_STEP)


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
