"""All reads and writes of the API side: create a job with its steps, fetch one, list them with keyset pagination.

The worker's fenced writes live in `service.leases`; both go through an `AsyncSession` per unit of work.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Select, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from service.errors import Conflict, InvalidParams, NotFound
from service.jobtypes import JobType
from service.models import Event, EventKind, Job, JobStatus, Step, StepStatus

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_job_id(job_type: str) -> str:
    """`<type>-<26 chars>`: 48 bits of milliseconds then 80 random bits, so ids sort by creation time."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_CROCKFORD[digit])
    return f"{job_type}-{''.join(reversed(chars))}"


@dataclass(frozen=True)
class Caller:
    actor: str
    source_ip: str | None


async def create_job(
    session: AsyncSession, job_type: JobType[Any], params: BaseModel, caller: Caller, idempotency_key: str | None
) -> Job:
    """Write the job, its planned steps and its `created` event in the session's transaction."""
    job = Job(
        job_id=new_job_id(job_type.name),
        type=job_type.name,
        status=JobStatus.PENDING,
        params=params.model_dump(mode="json"),
        target=job_type.target(params),
        actor=caller.actor,
        source_ip=caller.source_ip,
        idempotency_key=idempotency_key,
        attempt=0,
    )
    job.steps = [
        Step(job_id=job.job_id, step_order=order, name=step.name, status=StepStatus.PENDING, attempts=0)
        for order, step in enumerate(job_type.steps_for(params), start=1)
    ]
    try:
        # A savepoint, so that after a conflict the transaction can still look up the blocking job.
        async with session.begin_nested():
            session.add(job)
    except IntegrityError as exc:
        if "uq_ops_job_active_target" not in str(exc.orig):
            raise
        raise await _target_busy(session, job.target) from None
    # Added after the job's flush: the unit of work orders inserts by relationships, and events have none.
    session.add(Event(job_id=job.job_id, kind=EventKind.CREATED, status=JobStatus.PENDING, **_caller_columns(caller)))
    return job


def _caller_columns(caller: Caller) -> dict[str, Any]:
    return {"actor": caller.actor, "source_ip": caller.source_ip}


async def _target_busy(session: AsyncSession, target: str | None) -> Conflict:
    blocking = await session.scalar(
        select(Job.job_id).where(Job.target == target, Job.status.in_([JobStatus.PENDING, JobStatus.RUNNING]))
    )
    return Conflict(
        f"target {target!r} is busy with job {blocking or '(just finished; try again)'}; wait for it or cancel it",
        details={"target": target, "blocking_job_id": blocking},
    )


async def get_job(session: AsyncSession, job_id: str) -> Job:
    job = await session.scalar(select(Job).where(Job.job_id == job_id).options(selectinload(Job.steps)))
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


async def get_events(session: AsyncSession, job_id: str, after: int = 0) -> list[Event]:
    rows = await session.scalars(
        select(Event).where(Event.job_id == job_id, Event.event_id > after).order_by(Event.event_id)
    )
    return list(rows)


class ListFilter(BaseModel):
    type: str | None = None
    status: JobStatus | None = None
    actor: str | None = None
    target: str | None = None
    since: datetime | None = None


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        return datetime.fromisoformat(created_at), str(job_id)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidParams(
            "invalid cursor; pass back the next_cursor of a previous page unchanged",
            details=[{"field": "cursor", "message": "not a cursor this service issued"}],
        ) from None


async def list_jobs(
    session: AsyncSession, filters: ListFilter, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """Newest first; one page plus the cursor of the next (None on the last page)."""
    query: Select[Job] = select(Job).options(selectinload(Job.steps))
    for column, value in (
        (Job.type, filters.type),
        (Job.status, filters.status),
        (Job.actor, filters.actor),
        (Job.target, filters.target),
    ):
        if value is not None:
            query = query.where(column == value)
    if filters.since is not None:
        query = query.where(Job.created_at >= filters.since)
    if cursor is not None:
        created_at, job_id = _decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.job_id) < tuple_(created_at, job_id))
    rows = list(await session.scalars(query.order_by(Job.created_at.desc(), Job.job_id.desc()).limit(limit + 1)))
    page = rows[:limit]
    return page, encode_cursor(page[-1]) if len(rows) > limit else None
