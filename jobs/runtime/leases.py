"""A worker's hold on a job: claim, renew, release, and every write it makes while it runs the job.

A claim bumps `ops_job.attempt`; `(attempt, lease_owner)` is the fencing token. Every write starts by locking
the job row `FOR SHARE` on that token, so once another worker has taken the job over (a claim is an UPDATE of
that row, which waits for or invalidates the lock), nothing the old worker does can change the job any more.

The statements themselves are written out whole in `jobs.runtime.sql`; this module runs them and reads their
results. They go straight to the pooled connection's asyncpg driver, compiled once to its `$n` form; that took a
fifth off the worker's CPU per job (3.5 -> 2.8 ms), which SQLAlchemy's per-statement machinery had cost.

Fencing in time. A worker may act on a job only until its `Hold` ends: the time it *sent* the last renewal that
succeeded (or the claim), plus the lease TTL, less a margin (`Settings.lease_margin`), all on its own monotonic
clock. PostgreSQL starts the lease's TTL when it runs that statement, which is later, so the hold always ends
before the lease can expire and another worker take the job. Every statement here gives up after
`Settings.lease_statement_timeout_s` and never outlives the hold; the engine cancels the running step when the
hold ends, whether or not any statement has returned.

Writes survive short PostgreSQL outages: a connection failure is retried with backoff for as long as the hold
lasts, then the job is given up as lost and another worker resumes it once the lease has expired.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from jobs.runtime import sql
from jobs.runtime.health import DatabaseHealth
from service.backoff import Backoff
from service.db import Sessions, database_unavailable
from service.models import JobStatus, StepStatus

logger = logging.getLogger(__name__)

# A write is tried again while PostgreSQL is unreachable, for as long as the hold lasts.
WRITE_RETRIES = Backoff(initial_s=0.1, cap_s=2.0)


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


@dataclass
class Hold:
    """Until when (the event loop's monotonic clock) this worker may act on a job: the send time of the last
    renewal that succeeded (or of the claim) + the lease TTL - the margin. Moved on by each renewal."""

    until: float = math.inf
    renewed_sent_at: float = -math.inf

    def renewed(self, sent_at: float, ttl_s: float, margin_s: float) -> None:
        if sent_at > self.renewed_sent_at:
            self.renewed_sent_at = sent_at
            self.until = sent_at + ttl_s - margin_s


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
    # The step the claim started (its first unfinished one); None when a cancel was requested, or none was left.
    started_step: int | None = None
    # Runs of the job since a step of it last finished that lost their lease by blocking their worker's event loop.
    blocked_runs: int = 0
    hold: Hold = field(default_factory=Hold, compare=False)


@dataclass(frozen=True)
class Finished:
    """A step's result, recorded by the write that follows it (the next step's start, the job's end or a
    hand-back), so that moving on from one step to the next is one statement."""

    step: StepRow
    status: StepStatus
    detail: str | None


class Leases:
    """A worker's transitions of the jobs it runs. Every transition is one statement in its own transaction, so
    progress is visible at once and costs one round trip."""

    def __init__(
        self,
        sessions: Sessions,
        owner: str,
        ttl_s: float,
        *,
        margin_s: float | None = None,
        statement_timeout_s: float | None = None,
        health: DatabaseHealth | None = None,
    ) -> None:
        """`sessions`: only for the engine they are bound to; no ORM session is opened. `margin_s` and
        `statement_timeout_s` default as `Settings.lease_margin` and `Settings.lease_statement_timeout_s` do."""
        self.owner = owner
        self._ttl_s = ttl_s
        self._margin_s = ttl_s / 5 if margin_s is None else margin_s
        self._statement_timeout_s = ttl_s / 4 if statement_timeout_s is None else statement_timeout_s
        self._engine = _engine(sessions)
        self.health = health or DatabaseHealth()

    async def _fetchrow(
        self, statement: _Statement, values: Mapping[str, Any], timeout_s: float | None = None
    ) -> asyncpg.Record | None:
        """One statement under the lease statement timeout (or `timeout_s`), telling `health` how it went."""
        try:
            rows = await _fetch(self._engine, statement, values, timeout_s or self._statement_timeout_s)
        except Exception as exc:
            if database_unavailable(exc):
                self.health.failed(exc)
            raise
        self.health.reached()
        return rows[0] if rows else None

    async def claim(self, job_id: str) -> Lease | None:
        """Take a pending job, or a running one whose lease expired, and start its first unfinished step; None
        when someone else holds it or it ended."""
        values = {"job_id": job_id, "owner": self.owner, "ttl": self._ttl_s, "actor": f"worker:{self.owner}"}
        sent_at = asyncio.get_running_loop().time()
        row = await self._fetchrow(_CLAIM, values)
        if row is None:
            return None
        hold = Hold()
        hold.renewed(sent_at, self._ttl_s, self._margin_s)
        return Lease(
            job_id=job_id,
            owner=self.owner,
            attempt=row["attempt"],
            type=row["type"],
            params=row["params"],
            steps=tuple(
                StepRow(order, name, StepStatus(status), attempts, detail)
                for order, name, status, attempts, detail in row["steps"]
            ),
            state=row["state"],
            previous_owner=row["previous_owner"],
            started_step=row["started_step"],
            blocked_runs=row["blocked_runs"],
            hold=hold,
        )

    async def _write(self, lease: Lease, statement: _Fenced, **params: Any) -> float:
        """Run one fenced write: a single statement, in its own implicit transaction (one round trip). Returns
        when the try that succeeded was sent (on the event loop's clock); LeaseLost once the hold has ended."""
        values = {"job_id": lease.job_id, "attempt": lease.attempt, "owner": lease.owner, **params}
        values["actor"] = f"worker:{lease.owner}"
        loop = asyncio.get_running_loop()
        retries = WRITE_RETRIES.retries(deadline=lease.hold.until)
        while True:
            sent_at = loop.time()
            remaining = lease.hold.until - sent_at
            if remaining <= 0:
                raise LeaseLost(self._hold_ended(lease, sent_at))
            try:
                row = await self._fetchrow(statement.statement, values, min(self._statement_timeout_s, remaining))
                break
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                retries.deadline = lease.hold.until  # a renewal meanwhile moved it on
                delay = retries.failed()
                if retries.exhausted:
                    raise LeaseLost(f"{self._hold_ended(lease, loop.time())}: {_said(exc)}") from exc
                logger.warning("PostgreSQL unreachable, retrying in %.1fs: %s", delay, _said(exc))
                await asyncio.sleep(delay)
        assert row is not None  # the statement's last SELECT has no FROM: always one row
        if not row["held"]:
            raise LeaseLost(f"job {lease.job_id} attempt {lease.attempt} is no longer held by {lease.owner}")
        if row["cancel_requested_at"] is not None and statement.cancellable:
            raise CancelRequested(await self._cancel_reason(lease.job_id, row["cancel_requested_at"]))
        return sent_at

    def _hold_ended(self, lease: Lease, now: float) -> str:
        return (
            f"PostgreSQL not reached for {now - lease.hold.renewed_sent_at:.1f}s: the lease could expire within "
            f"{self._margin_s:g}s, so this worker stops acting on the job before another may take it over"
        )

    async def _write_after(self, lease: Lease, statements: _AfterDone, after: Finished | None, **params: Any) -> None:
        """A write that first records `after`, the step that just finished, when there is one."""
        if after is None:
            await self._write(lease, statements.alone, **params)
            return
        await self._write(lease, statements.after_done, **_done_params(after), **params)

    async def _cancel_reason(self, job_id: str, requested_at: datetime) -> str:
        try:
            row = await self._fetchrow(_CANCEL_REQUESTED_BY, {"job_id": job_id})
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            row = None
        actor = row["actor"] if row is not None else None
        return f"cancelled by {actor or 'an operator'} at {requested_at.isoformat(timespec='seconds')}"

    async def blocked_past_lease(self, lease: Lease, step: str, seconds: float) -> None:
        """Note in the job's history that `step` blocked this worker's event loop for `seconds`, past the lease
        (not fenced: the lease is gone); later claims count these notes."""
        detail = f"blocked the event loop of worker {lease.owner} for {seconds:.1f}s, past its lease"
        values = {"job_id": lease.job_id, "step": step, "detail": detail, "actor": f"worker:{lease.owner}"}
        await self._fetchrow(_BLOCKED_PAST_LEASE, values)

    async def ping(self) -> None:
        """One round trip to PostgreSQL, reported to `health`."""
        await self._fetchrow(_PING, {})

    async def check(self, lease: Lease) -> None:
        """Raises LeaseLost or CancelRequested; writes nothing."""
        await self._write(lease, _CHECK)

    async def renew(self, lease: Lease) -> None:
        """The lease runs for another TTL, and the hold moves on from the time this renewal was sent."""
        sent_at = await self._write(lease, _RENEW, ttl=self._ttl_s)
        lease.hold.renewed(sent_at, self._ttl_s, self._margin_s)

    async def release(self, lease: Lease, reason: str, after: Finished | None = None) -> None:
        """Give the job back (worker stopping): pending again, so any worker may claim it at once; the step that
        was running is pending again and will run again."""
        await self._write_after(lease, _RELEASE, after, detail=reason)

    async def start_step(self, lease: Lease, step: StepRow, after: Finished | None = None) -> None:
        """Checks for a cancel request first: a cancelled job never starts another step (`after` is recorded
        all the same)."""
        await self._write_after(lease, _START_STEP, after, step_order=step.order, step=step.name)

    async def remember(self, lease: Lease, values: dict[str, Any]) -> None:
        """Merge `values` into the job's state (JSONB `||`), for later steps and for a resumed run."""
        await self._write(lease, _REMEMBER, state=json.dumps(values))

    async def progress(self, lease: Lease, step: StepRow, detail: str) -> None:
        await self._write(lease, _PROGRESS, step_order=step.order, step=step.name, detail=detail)

    async def finish_step(self, lease: Lease, finished: Finished) -> None:
        """Record a step's result on its own; usually it goes with the next write (`after`)."""
        await self._write(lease, _FINISH_STEP, **_done_params(finished))

    async def finish_job(
        self, lease: Lease, status: JobStatus, error: str | None = None, after: Finished | None = None
    ) -> None:
        await self._write_after(lease, _FINISH_JOB, after, job_status=status.value, error=error)


def _done_params(finished: Finished) -> dict[str, Any]:
    return {
        "done_order": finished.step.order,
        "done_step": finished.step.name,
        "done_status": finished.status.value,
        "done_detail": finished.detail,
    }


def _engine(sessions: Sessions) -> AsyncEngine:
    bind = sessions.kw["bind"]
    assert isinstance(bind, AsyncEngine)
    return bind


async def _fetch(
    engine: AsyncEngine, statement: _Statement, values: Mapping[str, Any], timeout_s: float
) -> list[asyncpg.Record]:
    """One statement, on its own (asyncpg outside a transaction is in autocommit), straight to the pooled
    connection's driver, within `timeout_s` from the pool's checkout to the last row. The JSON codecs that
    SQLAlchemy's dialect registered on the connection decode JSON columns."""
    async with asyncio.timeout(timeout_s), engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        try:
            rows: list[asyncpg.Record] = await driver.fetch(statement.sql, *[values[n] for n in statement.names])
        except BaseException as exc:
            if not isinstance(exc, asyncpg.PostgresError) or database_unavailable(exc):
                # Gone, or in an unknown state: closed at once (a graceful close would wait on a silent network
                # for seconds), and the pool opens a new one.
                driver.terminate()
                await conn.invalidate()
            raise
    return rows


def _said(exc: BaseException) -> str:
    """An error as a log line or a job's error says it: a timeout has no text of its own."""
    return str(exc) or f"no answer ({type(exc).__name__})"


_ASYNCPG = asyncpg_dialect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class _Statement:
    """A statement as asyncpg takes it: `$n` placeholders, and the names of the values that fill them, in order."""

    sql: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, named: str) -> _Statement:
        """`named`: a statement of `jobs.runtime.sql`, with `:name` parameters."""
        compiled = text(named).compile(dialect=_ASYNCPG)
        return cls(compiled.string, tuple(compiled.positiontup or ()))


@dataclass(frozen=True)
class _Fenced:
    statement: _Statement
    # Refused once a cancel is requested; the other writes record the cancel itself, or a hand-back.
    cancellable: bool


@dataclass(frozen=True)
class _AfterDone:
    """A write, and the same write recording first the step that just finished (`sql.*_AFTER_DONE`)."""

    alone: _Fenced
    after_done: _Fenced


def _after_done(alone: str, after_done: str, cancellable: bool = False) -> _AfterDone:
    return _AfterDone(_Fenced(_Statement.of(alone), cancellable), _Fenced(_Statement.of(after_done), cancellable))


# Compiled once, at import. Cancellable: the statements whose writes are made under `go` (see jobs.runtime.sql).
_CLAIM = _Statement.of(sql.CLAIM)
_CHECK = _Fenced(_Statement.of(sql.CHECK), cancellable=True)
_RENEW = _Fenced(_Statement.of(sql.RENEW), cancellable=True)
_START_STEP = _after_done(sql.START_STEP, sql.START_STEP_AFTER_DONE, cancellable=True)
_PROGRESS = _Fenced(_Statement.of(sql.PROGRESS), cancellable=False)
_REMEMBER = _Fenced(_Statement.of(sql.REMEMBER), cancellable=False)
_FINISH_STEP = _Fenced(_Statement.of(sql.FINISH_STEP), cancellable=False)
_FINISH_JOB = _after_done(sql.FINISH_JOB, sql.FINISH_JOB_AFTER_DONE)
_RELEASE = _after_done(sql.RELEASE, sql.RELEASE_AFTER_DONE)
_CANCEL_REQUESTED_BY = _Statement.of(sql.CANCEL_REQUESTED_BY)
_PING = _Statement.of(sql.PING)
_BLOCKED_PAST_LEASE = _Statement.of(sql.BLOCKED_PAST_LEASE)
_DUE_FOR_DELIVERY = _Statement.of(sql.DUE_FOR_DELIVERY)
_RECORD_REDELIVERED = _Statement.of(sql.RECORD_REDELIVERED)
_EXPIRE_APPROVALS = _Statement.of(sql.EXPIRE_APPROVALS)


@dataclass(frozen=True)
class Due:
    job_id: str
    attempt: int
    status: JobStatus
    lease_owner: str | None
    # How long it has been due: since it was created (pending) or since its lease expired (running).
    waited_s: float


async def due_for_delivery(sessions: Sessions, pending_after_s: float, limit: int, timeout_s: float) -> list[Due]:
    """Jobs that need a delivery: pending for a while (maybe never enqueued), or running on an expired lease
    (their worker died). Oldest first."""
    values = {"pending_after_s": pending_after_s, "limit": limit}
    rows = await _fetch(_engine(sessions), _DUE_FOR_DELIVERY, values, timeout_s)
    return [
        Due(row["job_id"], row["attempt"], JobStatus(row["status"]), row["lease_owner"], float(row["waited_s"]))
        for row in rows
    ]


async def record_redelivered(sessions: Sessions, delivered: list[Due], reaper: str, timeout_s: float) -> None:
    """History for jobs the reaper put back on the queue (arq's dedupe makes repeats no-ops, so no repeats here)."""
    values = {
        "job_ids": [due.job_id for due in delivered],
        "statuses": [due.status.value for due in delivered],
        "details": [
            f"lease of {due.lease_owner} (attempt {due.attempt}) expired"
            if due.status == JobStatus.RUNNING
            else "pending and not in the queue"
            for due in delivered
        ],
        "actor": f"reaper:{reaper}",
    }
    await _fetch(_engine(sessions), _RECORD_REDELIVERED, values, timeout_s)


async def expire_approvals(sessions: Sessions, limit: int, reaper: str, timeout_s: float) -> list[str]:
    """Reject the jobs whose approval is overdue (`approval expired`); their ids."""
    values = {"limit": limit, "actor": f"reaper:{reaper}"}
    rows = await _fetch(_engine(sessions), _EXPIRE_APPROVALS, values, timeout_s)
    return [row["job_id"] for row in rows]
