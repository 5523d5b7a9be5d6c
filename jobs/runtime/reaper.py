"""The reaper: every worker runs one. It delivers jobs that PostgreSQL says should run but Redis may not hold:
pending ones that never reached the queue (Redis was down at submit) and running ones whose lease expired
(their worker died). Safe to run on every worker at once: deliveries are deduplicated by arq's job id
(`service.queue.delivery_id`) and only one claim can win in PostgreSQL. It also ends the wait of jobs whose approval
is overdue, which no worker would otherwise ever look at.
"""

from __future__ import annotations

import asyncio
import logging

from arq.connections import ArqRedis

from jobs.runtime.health import DatabaseHealth
from jobs.runtime.leases import due_for_delivery, expire_approvals, record_redelivered
from jobs.runtime.metrics import WorkerMetrics
from service.backoff import Backoff
from service.db import Sessions, database_unavailable
from service.queue import Delivery, enqueue_many
from service.settings import Settings

logger = logging.getLogger(__name__)

BATCH = 500
# A reaper that cannot run (PostgreSQL down) waits longer between tries: in reaper intervals, doubling.
REAP_RETRIES = Backoff(initial_s=2.0, cap_s=16.0)


async def reap_once(
    sessions: Sessions, redis: ArqRedis, settings: Settings, reaper: str, metrics: WorkerMetrics | None = None
) -> int:
    """Reject overdue approvals, enqueue every job due for a delivery; returns how many were actually put back on
    the queue."""
    timeout_s = settings.db_command_timeout_s
    for job_id in await expire_approvals(sessions, BATCH, reaper, timeout_s):
        logger.info("job %s rejected: approval expired", job_id)
    due = await due_for_delivery(sessions, settings.requeue_pending_after_s, BATCH, timeout_s)
    outcomes = await enqueue_many(
        redis,
        [(job.job_id, job.attempt, int(job.waited_s // settings.redeliver_after_s)) for job in due],
        queue_name=settings.queue_name,
        timeout_s=settings.enqueue_timeout_s,
    )
    delivered = [job for job, outcome in zip(due, outcomes, strict=True) if outcome is Delivery.QUEUED]
    if metrics is not None:
        metrics.redelivered(job.status for job in delivered)
    if delivered:
        await record_redelivered(sessions, delivered, reaper, timeout_s)
    return len(delivered)


async def reap_forever(
    sessions: Sessions,
    redis: ArqRedis,
    settings: Settings,
    reaper: str,
    metrics: WorkerMetrics | None = None,
    health: DatabaseHealth | None = None,
) -> None:
    """Until cancelled. `health` hears whether PostgreSQL answered: an idle worker learns of an outage here."""
    retries = REAP_RETRIES.retries()
    intervals = 1.0
    while True:
        await asyncio.sleep(settings.reaper_interval_s * intervals)
        try:
            async with asyncio.timeout(settings.db_command_timeout_s):
                count = await reap_once(sessions, redis, settings, reaper, metrics)
        except Exception as exc:  # PostgreSQL down: back off, keep going
            if health is not None and database_unavailable(exc):
                health.failed(exc)
            intervals = retries.failed()
            logger.warning("reaper could not run (retrying with backoff): %s", exc)
            continue
        retries.succeeded()
        if health is not None:
            health.reached()
        intervals = 1.0
        if count:
            logger.info("reaper delivered %d job(s) again", count)
