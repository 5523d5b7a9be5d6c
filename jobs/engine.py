"""Runs one job: claim it, keep the lease alive, run its unfinished steps in order, record every transition.

Each step runs under its own deadline (`asyncio.timeout_at`); transient errors are retried with exponential
backoff and jitter inside that deadline. A step that was in flight when a worker died runs again on the next
claim (its `attempts` shows it); finished steps never run twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from service.jobtypes import JobType, Registry, Step
from service.leases import Lease, LeaseLost, Leases, StepRow
from service.logs import log_context
from service.models import JobStatus, StepStatus

logger = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class Runtime:
    """What the worker process holds for all the jobs it runs."""

    leases: Leases
    registry: Registry
    lease_ttl_s: float
    # What each job type's lifespan yielded, by job type name.
    resources: dict[str, Any] = field(default_factory=dict)


class _Context:
    """The `StepContext` a step receives."""

    def __init__(self, leases: Leases, lease: Lease, row: StepRow, resource: Any) -> None:
        self.leases = leases
        self.lease = lease
        self.row = row
        self._resource = resource
        self.last_detail: str | None = row.detail

    @property
    def job_id(self) -> str:
        return self.lease.job_id

    @property
    def step(self) -> str:
        return self.row.name

    @property
    def attempt(self) -> int:
        return self.lease.attempt

    @property
    def resource(self) -> Any:
        return self._resource

    async def progress(self, detail: str) -> None:
        if detail != self.last_detail:
            self.last_detail = detail
            await self.leases.progress(self.lease, self.row, detail)


@dataclass(frozen=True)
class _Failure:
    step: str
    error: str


async def run_job(runtime: Runtime, job_id: str) -> str:
    """The arq job: returns what happened, for arq's own log line."""
    lease = await runtime.leases.claim(job_id)
    if lease is None:
        logger.info("job %s is finished or held by another worker; nothing to do", job_id)
        return "not claimed"
    with log_context(job_id=job_id, attempt=lease.attempt):
        logger.info("claimed job %s (type %s, attempt %d)", job_id, lease.type, lease.attempt)
        try:
            status = await _run_leased(runtime, lease)
        except LeaseLost as exc:
            logger.warning("stopped job %s: %s", job_id, exc)
            return "lease lost"
        except asyncio.CancelledError:
            await _release(runtime.leases, lease)
            raise
        logger.info("job %s finished: %s", job_id, status)
        return str(status)


async def _run_leased(runtime: Runtime, lease: Lease) -> JobStatus:
    job_type = runtime.registry.get(lease.type)
    params = job_type.params.model_validate(lease.params)
    try:
        async with asyncio.TaskGroup() as group:
            keeper = group.create_task(_keep_lease(runtime, lease))
            failure = await _run_steps(runtime, lease, job_type, params)
            keeper.cancel()
    except ExceptionGroup as group:
        # Only the steps or the keeper can fail, and the other is then cancelled: surface the one error.
        raise group.exceptions[0] from None
    if failure is None:
        await runtime.leases.finish_job(lease, JobStatus.SUCCESS)
        return JobStatus.SUCCESS
    await runtime.leases.finish_job(lease, JobStatus.FAILED, f"step {failure.step} failed: {failure.error}")
    return JobStatus.FAILED


async def _keep_lease(runtime: Runtime, lease: Lease) -> None:
    """Renew every third of the TTL; give the job up once the lease could have expired unrenewed."""
    loop = asyncio.get_running_loop()
    renewed_at = loop.time()
    while True:
        await asyncio.sleep(runtime.lease_ttl_s / 3)
        try:
            await runtime.leases.renew(lease)
            renewed_at = loop.time()
        except LeaseLost:
            raise
        except Exception as exc:  # a database outage: keep trying while the lease may still be ours
            if loop.time() - renewed_at >= runtime.lease_ttl_s:
                raise LeaseLost(f"could not renew the lease for {runtime.lease_ttl_s:g}s: {exc}") from exc
            logger.warning("lease renewal failed, retrying: %s", exc)


async def _run_steps(runtime: Runtime, lease: Lease, job_type: JobType[Any], params: BaseModel) -> _Failure | None:
    resource = runtime.resources.get(job_type.name)
    for row in lease.steps:
        if row.status in (StepStatus.SUCCESS, StepStatus.SKIPPED):
            continue
        with log_context(step=row.name):
            ctx = _Context(runtime.leases, lease, row, resource)
            error = await _run_step(ctx, job_type.step(row.name), params)
        if error is not None:
            return _Failure(row.name, error)
    return None


async def _run_step(ctx: _Context, step: Step[Any], params: BaseModel) -> str | None:
    """Run one step to success or failure; returns the error text on failure."""
    leases, lease, row = ctx.leases, ctx.lease, ctx.row
    loop = asyncio.get_running_loop()
    deadline = loop.time() + step.timeout_s
    tries = 0
    while True:
        tries += 1
        await leases.start_step(lease, row)
        deadline_cm = asyncio.timeout_at(deadline)
        try:
            async with deadline_cm:
                detail = await step.run(ctx, params)
        except TimeoutError as exc:
            if not deadline_cm.expired():
                error = _describe(exc)
            else:
                waiting = f"; last seen: {ctx.last_detail}" if ctx.last_detail else ""
                error = f"StepTimeout: no result within {step.timeout_s:g}s{waiting}"
        except step.retry_on as exc:
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
            if tries >= step.max_attempts or loop.time() + delay >= deadline:
                error = f"{_describe(exc)} (gave up after {tries} tries)"
            else:
                logger.warning("step %s try %d failed, retrying in %.1fs: %s", row.name, tries, delay, exc)
                await ctx.progress(f"try {tries} failed ({_describe(exc)}); retrying in {delay:.1f}s")
                await asyncio.sleep(delay)
                continue
        except (LeaseLost, asyncio.CancelledError):
            raise
        except Exception as exc:
            logger.exception("step %s failed", row.name)
            error = _describe(exc)
        else:
            await leases.finish_step(lease, row, StepStatus.SUCCESS, detail)
            return None
        await leases.finish_step(lease, row, StepStatus.FAILED, f"error: {error}")
        return error


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _release(leases: Leases, lease: Lease) -> None:
    """The worker is stopping: hand the job back now instead of letting another worker wait for the lease."""
    try:
        async with asyncio.timeout(5):
            await leases.release(lease, "worker stopped; the interrupted step will run again")
    except Exception as exc:
        logger.warning(
            "could not release job %s (the reaper will take it once the lease expires): %s", lease.job_id, exc
        )
