"""The only module that knows arq: the Redis client, the queued function's name, and how a job id is enqueued.

arq only delivers job ids; PostgreSQL decides who runs what (see `jobs.runtime.leases`). Keeping arq behind this
module means it could be swapped without touching the API or the engine.

Enqueueing writes what arq's own `enqueue_job` writes (its key prefixes, `serialize_job`, its expiry), in one
round trip instead of three. That leans on arq's storage format, read from arq 0.28 (the only version pyproject.toml
allows); every worker test consumes deliveries written this way, so a format change in arq fails them.

One clock. A delivery's score (when it is due) is Redis' own `TIME`, taken by the enqueue script, and a worker
compares scores with Redis' time too (`RedisClock`), never with its machine's wall clock: a process whose clock is
off (a submitting API two minutes ahead, a worker behind) changes no pickup.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Any, TypeVar

import arq.worker
from arq.connections import ArqRedis, RedisSettings
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.settings import Settings

logger = logging.getLogger(__name__)

RUN_JOB = "run_job"

T = TypeVar("T")


# A worker rides out a Redis outage of about this long (exponential backoff capped at 5 s), then exits so that
# its supervisor can restart it; its jobs are safe in PostgreSQL meanwhile.
REDIS_RETRIES = 60


class _SaidRetry(Retry):
    """redis-py's retry, saying each failure as it happens: a worker that cannot reach Redis says so at once and
    then at every try (at most 5 s apart), instead of retrying in silence for minutes."""

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[[RedisError], Any]) -> T:
        failures = 0

        async def said(error: RedisError) -> None:
            nonlocal failures
            failures += 1
            logger.warning("Redis unreachable, retry %d of %d with backoff: %s", failures, REDIS_RETRIES, error)
            await fail(error)

        return await super().call_with_retry(do, said)


def redis_settings(settings: Settings) -> RedisSettings:
    """The worker's Redis connection: every command is retried with backoff while Redis is unreachable."""
    redis = RedisSettings.from_dsn(settings.redis_url.get_secret_value())
    redis.conn_timeout = max(1, round(settings.enqueue_timeout_s))
    # OSError too: a refused connection reaches the retry as a bare OSError, before redis-py wraps it.
    redis.retry = _SaidRetry(
        ExponentialBackoff(cap=5, base=0.2),
        REDIS_RETRIES,
        supported_errors=(RedisConnectionError, RedisTimeoutError, OSError),  # type: ignore[arg-type]  # stub too narrow
    )
    redis.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    return redis


def create_redis(settings: Settings) -> ArqRedis:
    """A lazily connecting client: the API starts, and accepts jobs, even while Redis is down."""
    timeout = settings.enqueue_timeout_s
    pool = ConnectionPool.from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=timeout, socket_timeout=timeout
    )
    return ArqRedis(pool, default_queue_name=settings.queue_name)


def delivery_id(job_id: str, attempt: int, round_: int = 0) -> str:
    """arq's job id for delivering a job after `attempt` claims, in its `round_` of waiting.

    arq refuses a second enqueue of an id whose job key still exists, so the API's enqueue and any number of reapers'
    re-enqueues of a job that never reached Redis collapse into one delivery. But a delivery taken by a worker that
    died before claiming the job keeps its keys in Redis for a day: a job that has waited a whole round since it
    became due gets a new id, which supersedes a stuck delivery (an extra delivery of a live one is harmless). A job
    whose lease expired gets a new id too, since `attempt` changed.
    """
    return f"{job_id}:{attempt}" if round_ == 0 else f"{job_id}:{attempt}:{round_}"


def job_of_delivery(delivery: str) -> str:
    """The job id a delivery id (`delivery_id`) delivers."""
    return delivery.split(":", 1)[0]


class Delivery(Enum):
    QUEUED = "queued"
    ALREADY_QUEUED = "already queued"
    FAILED = "failed"


async def enqueue(
    redis: ArqRedis, job_id: str, attempt: int, *, queue_name: str, timeout_s: float, round_: int = 0
) -> Delivery:
    """Put a job id on the queue. FAILED (logged) when Redis cannot take it: the job stays in PostgreSQL and
    the workers' reaper enqueues it once Redis is back. Duplicate deliveries are harmless: the claim in
    PostgreSQL lets only one run."""
    try:
        async with asyncio.timeout(timeout_s):
            queued = await redis.register_script(_ENQUEUE)(*_script_input(redis, job_id, attempt, round_, queue_name))
    except (RedisError, OSError, TimeoutError) as exc:
        logger.warning("could not enqueue job %s (it stays pending until the reaper enqueues it): %s", job_id, exc)
        return Delivery.FAILED
    return Delivery.QUEUED if queued else Delivery.ALREADY_QUEUED


async def enqueue_many(
    redis: ArqRedis, deliveries: Sequence[tuple[str, int, int]], *, queue_name: str, timeout_s: float
) -> list[Delivery]:
    """`enqueue` for each (job id, attempt, round), in one pipeline: two round trips (the pipeline checks that
    Redis has the script) however many jobs the reaper finds due, as after a Redis outage or behind a backlog."""
    if not deliveries:
        return []
    script = redis.register_script(_ENQUEUE)
    try:
        async with asyncio.timeout(timeout_s), redis.pipeline(transaction=False) as pipe:
            for job_id, attempt, round_ in deliveries:
                await script(*_script_input(redis, job_id, attempt, round_, queue_name), client=pipe)
            results = await pipe.execute()
    except (RedisError, OSError, TimeoutError) as exc:
        logger.warning("could not enqueue %d due job(s) (retried at the next pass): %s", len(deliveries), exc)
        return [Delivery.FAILED] * len(deliveries)
    return [Delivery.QUEUED if queued else Delivery.ALREADY_QUEUED for queued in results]


def _script_input(
    redis: ArqRedis, job_id: str, attempt: int, round_: int, queue_name: str
) -> tuple[tuple[str, str, str], tuple[int, bytes, int, str]]:
    """The script's KEYS and ARGV for one delivery, as arq would write it."""
    delivery = delivery_id(job_id, attempt, round_)
    now = timestamp_ms()
    payload = serialize_job(RUN_JOB, (job_id,), {}, None, now, serializer=redis.job_serializer)
    return (job_key_prefix + delivery, result_key_prefix + delivery, queue_name), (
        redis.expires_extra_ms, payload, now, delivery,
    )  # fmt: skip


# What arq's `enqueue_job` does, as one atomic script: one round trip instead of three (WATCH, EXISTS, then
# MULTI/EXEC). The job is queued, as arq would queue it, only if neither its key nor its result's key exists; it
# expires as arq's do; its score is Redis' time in ms (the clock every worker compares it with, see RedisClock).
# KEYS: job key, result key, queue. ARGV: expiry in ms, arq's serialized job, (unused), job id.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('PSETEX', KEYS[1], ARGV[1], ARGV[2])
local now = redis.call('TIME')
redis.call('ZADD', KEYS[3], now[1] * 1000 + math.floor(now[2] / 1000), ARGV[4])
return 1
"""


class RedisClock:
    """Redis' `TIME`, as this process sees it: read at each `sync`, and run on from there on the monotonic clock, so
    that this machine's wall clock (wrong, or stepped) never enters it. Off by at most half a round trip."""

    def __init__(self) -> None:
        self._offset_ms: float | None = None  # Redis' time minus the monotonic clock, in ms

    async def sync(self, redis: Redis) -> None:
        before = time.monotonic()
        seconds, micros = await redis.time()
        after = time.monotonic()
        self._offset_ms = seconds * 1000 + micros / 1000 - (before + after) * 500

    def now_ms(self) -> int:
        if self._offset_ms is None:  # never read: this machine's clock is all there is
            return int(time.time() * 1000)
        return int(time.monotonic() * 1000 + self._offset_ms)


def use_for_deliveries(clock: RedisClock) -> None:
    """arq's worker compares each delivery's score with `timestamp_ms()` when it polls, and adds it to a deferral:
    make that Redis' time. Process-wide, like arq's own function it replaces; every worker of a process reads the
    same Redis, so the same clock."""
    arq.worker.timestamp_ms = clock.now_ms  # type: ignore[attr-defined]


def _switch(worker: arq.worker.Worker) -> Callable[[bool], None]:
    def switch(on: bool) -> None:
        worker.allow_pick_jobs = on

    return switch


def intake_switch(ctx: dict[str, Any]) -> Callable[[bool], None]:
    """Called from the worker's `on_startup` with arq's ctx: a switch that stops (False) and resumes (True) the
    arq worker's polling for deliveries. arq hands its `Worker` to no hook, so it is found as the caller that owns
    `ctx`; if it is not there, the switch does nothing (and deliveries are handed back one by one instead)."""
    frame = sys._getframe(1)
    while frame is not None:
        found = frame.f_locals.get("self")
        if isinstance(found, arq.worker.Worker) and found.ctx is ctx:
            return _switch(found)
        frame = frame.f_back  # type: ignore[assignment]
    logger.warning("arq's worker not found: deliveries are handed back one by one while PostgreSQL is unreachable")
    return lambda on: None
