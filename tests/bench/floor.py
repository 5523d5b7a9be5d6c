"""The floor: the service's work done with nothing but asyncpg and arq, no HTTP, no ORM, no validation, no lease
fencing, no events after `created`. What this machine's stack can do at best; every service figure is divided
by the floor's.

- submit: one transaction inserting the job row, its 2 step rows and a `created` event, then an arq enqueue;
- worker (`arq tests.bench.floor.FloorWorkerSettings`): claim the row, step 1 running then success, step 2 running
  then success, job success; each its own autocommitted statement, as the service commits each transition;
- read and list: the queries a reader of the service's tables needs, on the service's own rows.

The floor writes to the `floor` schema (tables shaped like the service's); it reads the service's tables.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from typing import Any

import asyncpg
from arq.connections import ArqRedis, RedisSettings
from arq.worker import func

from jobs.noop import NoopParams
from jobs.worker import install_event_loop
from service.api.repository import new_id
from service.db import asyncpg_dsn
from service.settings import get_settings
from tests.bench.stack import FLOOR_QUEUE, FLOOR_SCHEMA

FLOOR_RUN = "floor_run"
# The row the service writes for `{"steps": 2}`, byte for byte.
PARAMS = json.dumps(NoopParams(steps=2).model_dump(mode="json"))
ACTOR = "bench"
SOURCE_IP = "127.0.0.1"

_S = FLOOR_SCHEMA
INSERT_JOB = f"""
    INSERT INTO {_S}.ops_job (job_id, type, status, params, actor, source_ip, attempt)
    VALUES ($1, 'noop', 'pending', $2::jsonb, $3, $4, 0)"""
INSERT_STEPS = f"""
    INSERT INTO {_S}.ops_job_step (job_id, step_order, name, status, attempts)
    VALUES ($1, 1, 'step-1', 'pending', 0), ($1, 2, 'step-2', 'pending', 0)"""
INSERT_EVENT = f"""
    INSERT INTO {_S}.ops_job_event (job_id, kind, status, actor, source_ip) VALUES ($1, 'created', 'pending', $2, $3)"""
CLAIM = f"""
    UPDATE {_S}.ops_job SET status = 'running', attempt = attempt + 1, lease_owner = $2,
        lease_expires_at = now() + interval '10 seconds', started_at = coalesce(started_at, now())
    WHERE job_id = $1 AND status = 'pending' RETURNING type, params"""
STEP_RUNNING = f"""
    UPDATE {_S}.ops_job_step SET status = 'running', attempts = attempts + 1, started_at = now(), finished_at = NULL
    WHERE job_id = $1 AND step_order = $2"""
STEP_SUCCESS = f"""
    UPDATE {_S}.ops_job_step SET status = 'success', finished_at = now(), detail = 'slept 0s'
    WHERE job_id = $1 AND step_order = $2"""
JOB_SUCCESS = f"""
    UPDATE {_S}.ops_job SET status = 'success', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL
    WHERE job_id = $1"""

JOB_COLUMNS = (
    "job_id, type, status, params, target, actor, source_ip, attempt, error, created_at, started_at, finished_at"
)
STEP_COLUMNS = "job_id, name, step_order, status, detail, attempts, started_at, finished_at"


class FloorClient:
    """The floor's side of the bench process: submits into the floor's tables, reads the service's."""

    def __init__(self, pool: asyncpg.Pool, redis: ArqRedis) -> None:
        self.pool = pool
        self.redis = redis

    async def submit(self) -> str:
        job_id = new_id("noop")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(INSERT_JOB, job_id, PARAMS, ACTOR, SOURCE_IP)
            await conn.execute(INSERT_STEPS, job_id)
            await conn.execute(INSERT_EVENT, job_id, ACTOR, SOURCE_IP)
        # Only after the commit, as the service does; the same delivery id shape (`<job>:<attempt>`).
        await self.redis.enqueue_job(FLOOR_RUN, job_id, _job_id=f"{job_id}:0", _queue_name=FLOOR_QUEUE)
        return job_id

    async def read(self, job_id: str) -> None:
        async with self.pool.acquire() as conn:
            job = await conn.fetchrow(f"SELECT {JOB_COLUMNS} FROM public.ops_job WHERE job_id = $1", job_id)
            if job is None:
                raise LookupError(job_id)
            await conn.fetch(
                f"SELECT {STEP_COLUMNS} FROM public.ops_job_step WHERE job_id = $1 ORDER BY step_order", job_id
            )

    async def list_page(self, status: str | None, cursor: tuple[datetime, str] | None, limit: int = 50) -> int:
        """One page newest first, keyset-paginated as the service does, plus the page's steps; returns its size."""
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            args.append(status)
            where.append(f"status = ${len(args)}")
        if cursor is not None:
            args.extend(cursor)
            where.append(f"(created_at, job_id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit + 1)
        query = (
            f"SELECT {JOB_COLUMNS} FROM public.ops_job {'WHERE ' + ' AND '.join(where) if where else ''}"
            f" ORDER BY created_at DESC, job_id DESC LIMIT ${len(args)}"
        )
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(query, *args)
            ids = [row["job_id"] for row in rows[:limit]]
            await conn.fetch(
                f"SELECT {STEP_COLUMNS} FROM public.ops_job_step WHERE job_id = ANY($1) ORDER BY job_id, step_order",
                ids,
            )
        return len(ids)


async def floor_run(ctx: dict[str, Any], job_id: str) -> str:
    pool: asyncpg.Pool = ctx["pool"]
    if await pool.fetchrow(CLAIM, job_id, ctx["owner"]) is None:
        return "not claimed"
    for order in (1, 2):
        await pool.execute(STEP_RUNNING, job_id, order)
        await pool.execute(STEP_SUCCESS, job_id, order)
    await pool.execute(JOB_SUCCESS, job_id)
    return "success"


async def startup(ctx: dict[str, Any]) -> None:
    settings = get_settings()
    # As quiet as the service's workers run in the benchmark (arq logs every job at INFO).
    logging.getLogger("arq").setLevel(settings.log_level)
    ctx["pool"] = await asyncpg.create_pool(
        asyncpg_dsn(settings.database_url.get_secret_value()),
        min_size=1,
        # As many connections as the service's engine holds.
        max_size=settings.db_pool_size,
        command_timeout=settings.db_command_timeout_s,
    )
    ctx["owner"] = f"floor:{os.getpid()}"
    await ctx["redis"].set(f"{FLOOR_QUEUE}:ready:{os.getpid()}", 1, ex=3600)


async def shutdown(ctx: dict[str, Any]) -> None:
    if "pool" in ctx:
        await ctx["pool"].close()


_settings = get_settings()
# The event loop the service's processes run on, for the floor's too (its worker, and the bench process that
# submits its jobs): the floor differs from the service only in what the service does.
install_event_loop()


class FloorWorkerSettings:
    """The service worker's arq settings (jobs.worker.WorkerSettings), with the floor's function."""

    functions = [func(floor_run, name=FLOOR_RUN)]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = RedisSettings.from_dsn(_settings.redis_url.get_secret_value())
    queue_name = _settings.queue_name
    max_jobs = _settings.worker_max_jobs
    poll_delay = _settings.worker_poll_delay_s
    keep_result = 0
