"""The API side's writes and its reads of one job: create a job with its steps, cancel or retry it, fetch it with its
events. Lists of jobs are `service.api.listing`'s.

Every statement is one SQLAlchemy Core expression or one named SQL statement written out whole, run on a connection
in autocommit: each is its own transaction and one round trip. Reads return the response models. The worker's
statements live in `jobs.runtime.sql`; the rule for both is in docs/database.md.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
from pydantic import BaseModel, TypeAdapter
from sqlalchemy import Select, Text, bindparam, cast, func, literal_column, select, text
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import KeyedColumnElement

from service.api.schemas import EventOut, JobOut, StepOut
from service.errors import Conflict, Forbidden, NotFound
from service.jobtypes import JobType
from service.models import ACTIVE, ACTIVE_TARGET_INDEX, Base, Event, EventKind, Job, JobStatus, Step, StepStatus
from service.settings import ApprovalPolicy

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    """`<prefix>-<26 chars>` (a job's prefix is its type): 48 bits of milliseconds then 80 random bits, so ids sort
    by creation time."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_CROCKFORD[digit])
    return f"{prefix}-{''.join(reversed(chars))}"


@dataclass(frozen=True)
class Caller:
    """Who writes: the key's name, its team (which every job it submits belongs to), its address, and whether it
    acts for the service's operators (on every team's jobs)."""

    actor: str
    team: str
    source_ip: str | None
    all_teams: bool = False

    @property
    def only_team(self) -> str | None:
        """The team whose jobs alone the caller may see and act on; None: every team's."""
        return None if self.all_teams else self.team


IDEMPOTENCY_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class Created:
    job: JobOut
    # True when the Idempotency-Key named an earlier job, which is returned instead of a new one.
    replayed: bool = False


# Job, steps and `created` event in one statement (one round trip, its own transaction). A job with an
# Idempotency-Key its actor already used is not inserted (no row comes back); a busy target raises a unique violation.
# Under an approval policy (`approvals` given) it awaits approval until now() + `expires_s` (the database's clock),
# with an `approval_requested` event after `created`.
_INSERT_JOB = text(f"""
WITH job AS (
    INSERT INTO ops_job (
        job_id, type, status, params, target, actor, team, source_ip, idempotency_key, attempt,
        approvals_required, approval_expires_at
    )
    VALUES (
        :job_id, :type,
        CASE WHEN CAST(:approvals AS integer) IS NULL
            THEN '{JobStatus.PENDING}' ELSE '{JobStatus.AWAITING_APPROVAL}' END,
        CAST(:params AS jsonb), :target, :actor, :team, :source_ip, :key, 0,
        :approvals, now() + make_interval(secs => CAST(:expires_s AS double precision))
    )
    ON CONFLICT (team, actor, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING job_id, status, created_at, approval_expires_at
),
steps AS (
    INSERT INTO ops_job_step (job_id, step_order, name, status, attempts)
    SELECT job.job_id, s.step_order, s.name, '{StepStatus.PENDING}', 0
    FROM job, unnest(CAST(:steps AS text[])) WITH ORDINALITY AS s (name, step_order)
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, status, detail, actor, source_ip)
    SELECT job.job_id, e.kind, job.status, e.detail, :actor, :source_ip
    FROM job, LATERAL (VALUES
        (1, '{EventKind.CREATED}', NULL, true),
        (2, '{EventKind.APPROVAL_REQUESTED}', CAST(:approval_detail AS text),
            job.status = '{JobStatus.AWAITING_APPROVAL}')
    ) AS e (n, kind, detail, ok)
    WHERE e.ok
    ORDER BY e.n
    RETURNING 1
)
SELECT created_at, approval_expires_at FROM job
""")
# An expired Idempotency-Key is freed for a new job; the old job keeps everything else.
_FREE_EXPIRED_KEY = text("""
UPDATE ops_job SET idempotency_key = NULL
WHERE team = :team AND actor = :actor AND idempotency_key = :key
    AND created_at < now() - make_interval(secs => CAST(:window AS double precision))
RETURNING job_id
""")


async def create_job(
    conn: AsyncConnection,
    job_type: JobType[Any],
    params: BaseModel,
    target: str | None,
    caller: Caller,
    idempotency_key: str | None,
    policy: ApprovalPolicy | None = None,
) -> Created:
    """Write the job (acting on `target`, which the caller may touch), its planned steps and its `created` event in
    one statement (`conn` is best in autocommit), and return the new job as the API shows it; or return the job the
    same Idempotency-Key created. Under `policy`, the job awaits its approvals instead of being pending."""
    values = params.model_dump(mode="json")
    job_id = new_id(job_type.name)
    steps = [step.name for step in job_type.steps_for(params)]
    row = {
        "job_id": job_id, "type": job_type.name, "params": json.dumps(values), "target": target,
        "key": idempotency_key, "steps": steps, **caller_columns(caller), **approval_columns(policy),
    }  # fmt: skip
    # Twice at most: a key whose job expired is freed, then the insert is tried again.
    for _ in range(2):
        try:
            created = (await conn.execute(_INSERT_JOB, row)).one_or_none()
        except IntegrityError as exc:
            if _violated_constraint(exc) != ACTIVE_TARGET_INDEX:
                raise
            await conn.rollback()
            raise await _target_busy(conn, target, caller.only_team) from None
        if created is not None:
            return Created(
                JobOut(
                    job_id=job_id,
                    type=job_type.name,
                    status=JobStatus.PENDING if policy is None else JobStatus.AWAITING_APPROVAL,
                    approvals_required=policy.approvals if policy else None,
                    approvals_given=0,
                    approval_expires_at=created.approval_expires_at,
                    params=values,
                    target=target,
                    actor=caller.actor,
                    team=caller.team,
                    source_ip=caller.source_ip,
                    attempt=0,
                    error=None,
                    created_at=created.created_at,
                    started_at=None,
                    finished_at=None,
                    steps=[
                        StepOut(
                            name=name,
                            step_order=order,
                            status=StepStatus.PENDING,
                            detail=None,
                            attempts=0,
                            started_at=None,
                            finished_at=None,
                        )
                        for order, name in enumerate(steps, start=1)
                    ],  # fmt: skip
                )
            )
        assert idempotency_key is not None  # only a reused key inserts nothing
        earlier = await _idempotent_replay(conn, job_type, values, caller, idempotency_key)
        if earlier is not None:
            return Created(earlier, replayed=True)
    raise Conflict(f"Idempotency-Key {idempotency_key!r} is being reused concurrently; try again")


async def _idempotent_replay(
    conn: AsyncConnection, job_type: JobType[Any], values: dict[str, Any], caller: Caller, key: str
) -> JobOut | None:
    """The job this actor created with `key` within the window, if the request is the same (else an error); None
    when the key's job has expired, and the key is free again."""
    window = IDEMPOTENCY_WINDOW.total_seconds()
    keyed = {"team": caller.team, "actor": caller.actor, "key": key}
    if await conn.scalar(_FREE_EXPIRED_KEY, {**keyed, "window": window}) is not None:
        return None
    jobs = await read_jobs(conn, _KEYED_JOB, keyed)
    if not jobs:
        return None  # freed meanwhile
    earlier = jobs[0]
    if earlier.type != job_type.name or earlier.params != values:
        # 409, not 422: the request is valid in itself (no schema can refuse it); it conflicts with the job that the
        # key already names, as a second submission racing on one key does.
        message = f"Idempotency-Key {key!r} was used for a different request (job {earlier.job_id})"
        raise Conflict(message, details={"field": "Idempotency-Key", "job_id": earlier.job_id})
    return earlier


# A job that no worker has started: cancelled at once.
_WAITING = f"('{JobStatus.PENDING}', '{JobStatus.AWAITING_APPROVAL}')"
# Cancel, in one statement. The job row is locked and read as it was, for the answer (404, 403, 409 or done); another
# team's job is not read at all (`only_team`: the caller's team, NULL for the service's operators). If the
# caller may act on it and it is unfinished: a cancel is requested, once (asking again changes nothing), and a waiting
# job is cancelled at once; each with its event. A running job is only flagged: its worker stops it within a second.
_CANCEL_JOB = text(f"""
WITH job AS (
    SELECT job_id, actor, status, cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND (team = CAST(:only_team AS text) OR CAST(:only_team AS text) IS NULL)
    FOR UPDATE
),
go AS (
    SELECT job_id, status, cancel_requested_at FROM job
    WHERE (actor = :actor OR CAST(:may_act_for_others AS boolean))
        AND status IN ('{JobStatus.AWAITING_APPROVAL}', '{JobStatus.PENDING}', '{JobStatus.RUNNING}')
),
cancelled AS (
    UPDATE ops_job SET cancel_requested_at = coalesce(go.cancel_requested_at, now()),
        status = CASE WHEN go.status IN {_WAITING} THEN '{JobStatus.CANCELLED}' ELSE go.status END,
        finished_at = CASE WHEN go.status IN {_WAITING} THEN now() ELSE ops_job.finished_at END,
        error = CASE WHEN go.status IN {_WAITING} THEN CAST(:error AS text) ELSE ops_job.error END
    FROM go
    WHERE ops_job.job_id = go.job_id
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, status, actor, source_ip)
    SELECT go.job_id, e.kind, e.status, :actor, :source_ip
    FROM go, LATERAL (VALUES
        (1, '{EventKind.CANCEL_REQUESTED}', go.status, go.cancel_requested_at IS NULL),
        (2, '{EventKind.FINISHED}', '{JobStatus.CANCELLED}', go.status IN {_WAITING})
    ) AS e (n, kind, status, ok)
    WHERE e.ok
    ORDER BY e.n
    RETURNING 1
)
SELECT actor, status, EXISTS (SELECT 1 FROM go) AS done FROM job
""")
# Retry, in one statement: like cancel, the job row is locked and read as it was. If the caller may act on it and it
# failed or was cancelled, it is pending again from its first unfinished step (the steps that failed, were cancelled
# or were left running are pending again), with its `retried` event. Under an approval policy (`approvals`) it
# awaits approval again, from no votes. A busy target violates ACTIVE_TARGET_INDEX.
_RETRY_JOB = text(f"""
WITH job AS (
    SELECT job_id, actor, status FROM ops_job
    WHERE job_id = :job_id AND (team = CAST(:only_team AS text) OR CAST(:only_team AS text) IS NULL)
    FOR UPDATE
),
go AS (
    SELECT job_id FROM job
    WHERE (actor = :actor OR CAST(:may_act_for_others AS boolean))
        AND status IN ('{JobStatus.FAILED}', '{JobStatus.CANCELLED}')
),
retried AS (
    UPDATE ops_job SET
        status = CASE WHEN CAST(:approvals AS integer) IS NULL
            THEN '{JobStatus.PENDING}' ELSE '{JobStatus.AWAITING_APPROVAL}' END,
        error = NULL, finished_at = NULL, cancel_requested_at = NULL,
        approvals_required = :approvals, approvals_given = 0,
        approval_expires_at = now() + make_interval(secs => CAST(:expires_s AS double precision))
    FROM go
    WHERE ops_job.job_id = go.job_id
    RETURNING ops_job.job_id, ops_job.status
),
votes AS (
    DELETE FROM ops_job_approval USING go WHERE ops_job_approval.job_id = go.job_id
    RETURNING 1
),
steps AS (
    UPDATE ops_job_step SET status = '{StepStatus.PENDING}'
    FROM go
    WHERE ops_job_step.job_id = go.job_id
        AND ops_job_step.status IN ('{StepStatus.FAILED}', '{StepStatus.CANCELLED}', '{StepStatus.RUNNING}')
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, status, detail, actor, source_ip)
    SELECT retried.job_id, e.kind, retried.status, e.detail, :actor, :source_ip
    FROM retried, LATERAL (VALUES
        (1, '{EventKind.RETRIED}', NULL, true),
        (2, '{EventKind.APPROVAL_REQUESTED}', CAST(:approval_detail AS text),
            retried.status = '{JobStatus.AWAITING_APPROVAL}')
    ) AS e (n, kind, detail, ok)
    WHERE e.ok
    ORDER BY e.n
    RETURNING 1
)
SELECT actor, status, EXISTS (SELECT 1 FROM go) AS done FROM job
""")


async def cancel_job(conn: AsyncConnection, job_id: str, caller: Caller, may_act_for_others: bool) -> JobOut:
    """A pending job is cancelled at once; a running one is flagged, and its worker stops it within a second.
    One statement (`conn` is best in autocommit), then the job as it left it. Another team's job is not found."""
    error = f"cancelled by {caller.actor} before it ran"
    values = {"job_id": job_id, "may_act_for_others": may_act_for_others, "error": error, **caller_columns(caller)}
    row = _allowed(
        (await conn.execute(_CANCEL_JOB, values)).one_or_none(), job_id, caller, may_act_for_others, "cancel"
    )
    if not row.done:
        status = JobStatus(row.status)
        raise Conflict(f"job {job_id} is already {status}; there is nothing to cancel", details={"status": status})
    return await job_as_left(conn, job_id)


async def retry_job(
    conn: AsyncConnection,
    job_id: str,
    caller: Caller,
    may_act_for_others: bool,
    policy: ApprovalPolicy | None = None,
) -> JobOut:
    """Pending again from the first unfinished step (under `policy`: awaiting approval again); same job id, history
    kept. One statement (`conn` is best in autocommit), then the job as it left it. The caller enqueues it if it is
    pending. Another team's job is not found."""
    values = {
        "job_id": job_id, "may_act_for_others": may_act_for_others, **caller_columns(caller),
        **approval_columns(policy),
    }  # fmt: skip
    try:
        result = (await conn.execute(_RETRY_JOB, values)).one_or_none()
    except IntegrityError as exc:
        if _violated_constraint(exc) != ACTIVE_TARGET_INDEX:
            raise
        await conn.rollback()
        raise await _target_busy(conn, await conn.scalar(_TARGET_OF, {"job_id": job_id}), caller.only_team) from None
    row = _allowed(result, job_id, caller, may_act_for_others, "retry")
    if not row.done:
        raise Conflict(
            f"job {job_id} is {row.status}; only a failed or cancelled job can be retried",
            details={"status": row.status},
        )
    return await job_as_left(conn, job_id)


def _allowed(row: Row[Any] | None, job_id: str, caller: Caller, may_act_for_others: bool, verb: str) -> Row[Any]:
    """The job's row as a cancel or retry read it; NotFound or Forbidden when there is none for this caller."""
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    if row.actor != caller.actor and not may_act_for_others:
        raise Forbidden(
            f"job {job_id} belongs to {row.actor!r}; only a key with jobs:admin may {verb} another actor's job",
            details={"scope": "jobs:admin"},
        )
    return row


async def job_as_left(conn: AsyncConnection, job_id: str) -> JobOut:
    """The job as a write just left it: read right after it, on the same connection."""
    jobs = await read_jobs(conn, _GET_JOB, {"job_id": job_id})
    assert jobs, "a job is never deleted"
    return jobs[0]


def approval_columns(policy: ApprovalPolicy | None) -> dict[str, Any]:
    """The statement parameters that put a job under `policy` (None: under none)."""
    if policy is None:
        return {"approvals": None, "expires_s": None, "approval_detail": None}
    targets = ", ".join(policy.targets) if policy.targets else "any target"
    detail = (
        f"needs {policy.approvals} approval(s) by other people of the team within {policy.expires_s:g}s "
        f"(policy: {policy.job_type} on {targets})"
    )
    return {"approvals": policy.approvals, "expires_s": policy.expires_s, "approval_detail": detail}


def caller_columns(caller: Caller) -> dict[str, Any]:
    return {"actor": caller.actor, "team": caller.team, "source_ip": caller.source_ip, "only_team": caller.only_team}


def _violated_constraint(exc: IntegrityError) -> str | None:
    """The name of the constraint (or unique index) PostgreSQL reports violated, as asyncpg hands it over; SQLAlchemy
    wraps asyncpg's error in its own DBAPI-style one, raised from it."""
    driver_error = exc.orig.__cause__ if exc.orig is not None else None
    if isinstance(driver_error, asyncpg.IntegrityConstraintViolationError):
        name: str | None = driver_error.constraint_name
        return name
    return None


_TARGET_OF = select(Job.target).where(Job.job_id == bindparam("job_id"))
_BLOCKING_JOB = select(Job.job_id, Job.team).where(Job.target == bindparam("target"), Job.status.in_(ACTIVE))


async def _target_busy(conn: AsyncConnection, target: str | None, only_team: str | None) -> Conflict:
    """A target is held across teams, but another team's job is not named: its existence is not the caller's to
    know, only that the target is busy."""
    blocking = (await conn.execute(_BLOCKING_JOB, {"target": target})).one_or_none()
    if blocking is None:
        return Conflict(
            f"target {target!r} was busy with a job that has just finished; try again",
            details={"target": target, "blocking_job_id": None},
        )
    if only_team is not None and blocking.team != only_team:
        return Conflict(
            f"target {target!r} is busy with another team's job; try again once it has finished",
            details={"target": target, "blocking_job_id": None},
        )
    return Conflict(
        f"target {target!r} is busy with job {blocking.job_id}; wait for it or cancel it",
        details={"target": target, "blocking_job_id": blocking.job_id},
    )


def _columns(entity: type[Base], model: type[BaseModel]) -> list[KeyedColumnElement[Any]]:
    """The table columns a response model shows, by field name."""
    return [entity.__table__.c[name] for name in model.model_fields if name in entity.__table__.c]


def _json_object(columns: list[KeyedColumnElement[Any]], **more: Any) -> Any:
    """`json_build_object` of the columns (keyed by their names) and of `more`."""
    pairs: list[tuple[Any, Any]] = [(literal_column(f"'{column.key}'"), column) for column in columns]
    pairs += [(literal_column(f"'{name}'"), value) for name, value in more.items()]
    return func.json_build_object(*itertools.chain.from_iterable(pairs))


# Each job as its response shows it, steps in step order, rendered as JSON by PostgreSQL in one statement and
# parsed by pydantic: no ORM objects (building them was over 40% of the API CPU a page cost), no second query for
# the steps, and no JSON decoded in Python. (Not an array of rows: asyncpg decodes those too, but looks up their
# type on each new connection first, 15 ms.) Times are UTC: the connections' time zone (service.db).
_STEPS_JSON = (
    select(
        func.coalesce(
            func.json_agg(aggregate_order_by(_json_object(_columns(Step, StepOut)), Step.step_order)),
            literal_column("'[]'::json"),
        )
    )
    .where(Step.job_id == Job.job_id)
    .scalar_subquery()
)
JOBS_OUT = select(cast(_json_object(_columns(Job, JobOut), steps=_STEPS_JSON), Text))
_JOB_LIST = TypeAdapter(list[JobOut])


async def read_jobs(conn: AsyncConnection, query: Select[Any], params: dict[str, Any] | None = None) -> list[JobOut]:
    rendered = (await conn.execute(query, params)).scalars().all()
    return _JOB_LIST.validate_json(f"[{','.join(rendered)}]")


# Built once, parameters bound at each call: a statement built per call costs its cache key every time.
_GET_JOB = JOBS_OUT.where(Job.job_id == bindparam("job_id"))
_GET_TEAM_JOB = _GET_JOB.where(Job.team == bindparam("team"))
_KEYED_JOB = JOBS_OUT.where(
    Job.team == bindparam("team"), Job.actor == bindparam("actor"), Job.idempotency_key == bindparam("key")
)
_EVENT_COLUMNS = _columns(Event, EventOut)
_GET_EVENTS = (
    select(*_EVENT_COLUMNS)
    .where(Event.job_id == bindparam("job_id"), Event.event_id > bindparam("after"))
    .order_by(Event.event_id)
)


_PING = text("SELECT 1")
_JOB_COUNTS = select(Job.type, Job.status, func.count()).group_by(Job.type, Job.status)


async def ping(conn: AsyncConnection) -> None:
    """PostgreSQL answers (the readiness probe)."""
    await conn.execute(_PING)


async def count_jobs(conn: AsyncConnection) -> list[tuple[str, str, int]]:
    """Jobs by (type, status): one pass over ops_job whatever its size; grouped in PostgreSQL, so only a few rows
    come back."""
    rows = await conn.execute(_JOB_COUNTS)
    return [(row[0], row[1], row[2]) for row in rows]


async def get_job(conn: AsyncConnection, job_id: str, *, team: str | None) -> JobOut:
    """The job and its steps in one statement: one round trip, and one snapshot of both. With `team`, another
    team's job is not found, as if it did not exist."""
    if team is None:
        jobs = await read_jobs(conn, _GET_JOB, {"job_id": job_id})
    else:
        jobs = await read_jobs(conn, _GET_TEAM_JOB, {"job_id": job_id, "team": team})
    if not jobs:
        raise NotFound(f"no job {job_id!r}")
    return jobs[0]


_TEAM_JOB_IDS = select(Job.job_id).where(
    Job.job_id.in_(bindparam("ids", expanding=True)), Job.team == bindparam("team")
)


async def team_job_ids(conn: AsyncConnection, job_ids: list[str], team: str) -> set[str]:
    """Those of `job_ids` that belong to `team`."""
    if not job_ids:
        return set()
    return set((await conn.execute(_TEAM_JOB_IDS, {"ids": job_ids, "team": team})).scalars())


async def get_events(conn: AsyncConnection, job_id: str, after: int = 0) -> list[EventOut]:
    rows = await conn.execute(_GET_EVENTS, {"job_id": job_id, "after": after})
    return [EventOut.model_validate(row, from_attributes=True) for row in rows]
