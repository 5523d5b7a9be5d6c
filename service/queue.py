"""The only module that knows arq: the Redis client, the queued function's name, and how a job id is enqueued.

arq only delivers job ids; PostgreSQL decides who runs what (see `jobs.runtime.leases`). Keeping arq behind this
module means it could be swapped without touching the API or the engine.

Enqueueing writes what arq's own `enqueue_job` writes (its key prefixes, `serialize_job`, its expiry), in one
round trip instead of three. That leans on arq's storage format, read from arq 0.28 (the only version pyproject.toml
allows); every worker test consumes deliveries written this way, so a format change in arq fails them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Any, TypeVar

from arq.connections import ArqRedis, RedisSettings
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio import ConnectionPool
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
# expires as arq's do. KEYS: job key, result key, queue. ARGV: expiry in ms, arq's serialized job, score, job id.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('PSETEX', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""
