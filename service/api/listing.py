"""Reads over many jobs: the job list (keyset pages, filters that combine), its counts by status, and the events of
every job a caller may see (the list-level stream). The JSON API and the console read through these alone.

Every filter is a condition of the one statement that reads, the caller's team among them (`ListFilter.team`), so
no page, count or event can show another team's job.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator
from sqlalchemy import ColumnElement, Select, bindparam, func, literal_column, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from service.api.input_limits import unstorable
from service.api.repository import JOBS_OUT, read_jobs
from service.api.schemas import EventOut, JobOut, JobPage
from service.errors import InvalidParams
from service.models import Event, Job, JobStatus


def _iso8601(value: object) -> object:
    """ISO 8601 only (pydantic alone would also take a number as a Unix time); without a zone, UTC."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("expected an ISO 8601 date-time, e.g. 2026-11-29T08:00:00Z") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return value


def comma_list(value: object) -> object:
    """`failed,cancelled` (or a list of such strings, from repeated parameters) as a list; empty items dropped."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        items = [item.strip() for raw in value for item in str(raw).split(",") if item.strip()]
        return items or None
    return value


Statuses = Annotated[tuple[JobStatus, ...], BeforeValidator(comma_list)]
TimeFilter = Annotated[datetime, BeforeValidator(_iso8601)]


class ListFilter(BaseModel):
    """Which jobs: each given filter narrows the list (several statuses: any of them)."""

    type: str | None = None
    status: Statuses | None = None
    actor: str | None = None
    target: str | None = None
    team: str | None = None
    since: TimeFilter | None = None
    until: TimeFilter | None = None

    @classmethod
    def within(cls, query: BaseModel) -> ListFilter:
        """The filters a request's query holds among its other parameters (a page's cursor, a stream's kinds)."""
        return cls.model_validate(query.model_dump(include=set(cls.model_fields), exclude_none=True))

    def bound(self) -> dict[str, Any]:
        """The given filters as statement parameters."""
        return {name: list(value) if name == "status" else value for name, value in self if value is not None}


def encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        if unstorable(job_id) is not None:
            raise ValueError("not a job id")
        return datetime.fromisoformat(created_at), str(job_id)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidParams(
            "invalid cursor; pass back the next_cursor of a previous page unchanged",
            details=[{"field": "cursor", "message": "not a cursor this service issued"}],
        ) from None


async def list_jobs(conn: AsyncConnection, filters: ListFilter, limit: int, cursor: str | None) -> JobPage:
    """Newest first; one page plus the cursor of the next (None on the last page)."""
    params = filters.bound()
    if cursor is not None:
        params["after_created_at"], params["after_job_id"] = _decode_cursor(cursor)
    jobs = await read_jobs(conn, _list_query(frozenset(params)), {**params, "limit": limit + 1})
    page = jobs[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].job_id) if len(jobs) > limit else None
    return JobPage(jobs=page, next_cursor=next_cursor)


def _conditions(given: Iterable[str]) -> list[ColumnElement[bool]]:
    """The WHERE conditions of the filters named in `given`, each with its bound parameter."""
    conditions: list[ColumnElement[bool]] = []
    for name in sorted(given):
        if name == "status":
            conditions.append(Job.status.in_(bindparam("status", expanding=True)))
        elif name == "since":
            conditions.append(Job.created_at >= bindparam("since"))
        elif name == "until":
            conditions.append(Job.created_at < bindparam("until"))
        elif name == "after_created_at":
            after = tuple_(bindparam("after_created_at", type_=Job.created_at.type), bindparam("after_job_id"))
            conditions.append(tuple_(Job.created_at, Job.job_id) < after)
        elif name != "after_job_id":
            conditions.append(Job.__table__.c[name] == bindparam(name))
    return conditions


@functools.cache
def _list_query(given: frozenset[str]) -> Select[Any]:
    """The page query for one set of given filters (and cursor), built once: a statement built per call costs its
    cache key every time."""
    return (
        JOBS_OUT.where(*_conditions(given)).order_by(Job.created_at.desc(), Job.job_id.desc()).limit(bindparam("limit"))
    )


_BY_ID = "ids"


async def jobs_by_id(conn: AsyncConnection, job_ids: list[str], filters: ListFilter) -> list[JobOut]:
    """Those of these jobs that pass `filters`, newest first (what a live page refreshes)."""
    params = filters.bound()
    query = JOBS_OUT.where(Job.job_id.in_(bindparam(_BY_ID, expanding=True)), *_conditions(params)).order_by(
        Job.created_at.desc(), Job.job_id.desc()
    )
    return await read_jobs(conn, query, {**params, _BY_ID: job_ids})


# Counting stops here for each status: an exact count of a million finished jobs would cost a scan of them at every
# page view, and "1000+" says as much to a person. Each count is then at most this many index entries.
COUNT_CAP = 1000


@functools.cache
def _count_query(given: frozenset[str]) -> Select[Any]:
    """One row: for each status, how many jobs of it match the other filters (at most COUNT_CAP)."""
    conditions = _conditions(given)
    counts = [
        select(func.count())
        .select_from(
            select(literal_column("1")).where(Job.status == status.value, *conditions).limit(COUNT_CAP).subquery()
        )
        .scalar_subquery()
        .label(status.value)
        for status in JobStatus
    ]
    return select(*counts)


async def count_by_status(conn: AsyncConnection, filters: ListFilter) -> dict[JobStatus, int]:
    """How many jobs of each status match `filters` but their status, each count capped at COUNT_CAP."""
    params = filters.model_copy(update={"status": None}).bound()
    row = (await conn.execute(_count_query(frozenset(params)), params)).one()
    return {status: row._mapping[status.value] for status in JobStatus}


@dataclass(frozen=True)
class ListedEvent:
    """An event with what the list-level stream filters and shows of its job."""

    job_id: str
    job_type: str
    job_target: str | None
    job_actor: str
    job_team: str
    job_status: str
    event: EventOut

    @property
    def event_id(self) -> int:
        return self.event.event_id

    def matches(self, filters: ListFilter) -> bool:
        """Whether its job passes `filters` (the time range aside: a stream is about now)."""
        return (
            (filters.type is None or filters.type == self.job_type)
            and (filters.target is None or filters.target == self.job_target)
            and (filters.actor is None or filters.actor == self.job_actor)
            and (filters.team is None or filters.team == self.job_team)
            and (filters.status is None or self.job_status in filters.status)
        )

    def data(self) -> str:
        """The stream's `data:` line: the event, with its job's id, type, target and current status."""
        job = {"job_id": self.job_id, "job_type": self.job_type, "job_target": self.job_target}
        return json.dumps({**job, "job_status": self.job_status, **self.event.model_dump(mode="json")})


_EVENT_COLUMNS = [Event.__table__.c[name] for name in EventOut.model_fields]
# The job's columns labelled apart from the event's (both have an actor and a status).
_LISTED = select(
    Job.job_id, Job.type.label("job_type"), Job.target.label("job_target"), Job.actor.label("job_actor"),
    Job.team.label("job_team"), Job.status.label("job_status"), *_EVENT_COLUMNS,
).join(Job, Job.job_id == Event.job_id)  # fmt: skip
_EVENTS_BY_ID = _LISTED.where(Event.event_id.in_(bindparam("ids", expanding=True))).order_by(Event.event_id)


def _listed(rows: Iterable[Any]) -> list[ListedEvent]:
    return [
        ListedEvent(
            row.job_id, row.job_type, row.job_target, row.job_actor, row.job_team, row.job_status,
            EventOut.model_validate(row, from_attributes=True),
        )
        for row in rows
    ]  # fmt: skip


async def events_by_id(conn: AsyncConnection, event_ids: list[int]) -> list[ListedEvent]:
    """These events in order, each with its job."""
    return _listed(await conn.execute(_EVENTS_BY_ID, {"ids": event_ids}))


@functools.cache
def _events_after_query(given: frozenset[str]) -> Select[Any]:
    return (
        _LISTED.where(Event.event_id > bindparam("after"), *_conditions(given - {"since", "until"}))
        .order_by(Event.event_id)
        .limit(bindparam("limit"))
    )


async def events_after(conn: AsyncConnection, after: int, filters: ListFilter, limit: int) -> list[ListedEvent]:
    """The first `limit` events after event `after` of the jobs that pass `filters`, in order: what a list-level
    stream that resumes has missed."""
    params = filters.model_copy(update={"since": None, "until": None}).bound()
    query = _events_after_query(frozenset(params))
    return _listed(await conn.execute(query, {**params, "after": after, "limit": limit}))


_LAST_EVENT = select(func.coalesce(func.max(Event.event_id), 0))


async def last_event_id(conn: AsyncConnection) -> int:
    """The newest event's id (0 if none): where a page rendered now has its live stream start."""
    return int(await conn.scalar(_LAST_EVENT) or 0)
