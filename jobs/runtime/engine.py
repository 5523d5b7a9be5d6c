"""Runs one job: claim it, keep the lease alive, run its unfinished steps in order, record every transition.

Each step runs under its own deadline (`asyncio.timeout_at`); transient errors are retried with exponential
backoff and jitter inside that deadline. A step that was in flight when a worker died runs again on the next
claim (its `attempts` shows it); finished steps never run twice.

While a job runs, a keeper task beside its steps renews the lease and watches for a cancel request. Three things
end a job early: a cancel request (the running step is cancelled and recorded `cancelled`), a lost lease (the
worker stops touching the job), and the worker stopping (the job is handed back for another worker).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from jobs.runtime.lag import timed
from jobs.runtime.leases import CancelRequested, Finished, Lease, LeaseLost, Leases, StepRow
from jobs.runtime.metrics import WorkerMetrics
from jobs.runtime.outcome import Outcome
from service.backoff import Backoff
from service.db import database_unavailable
from service.jobtypes import Registry, Step, UnknownJobType
from service.logs import log_context
from service.models import JobStatus, StepStatus
from service.settings import Settings

logger = logging.getLogger(__name__)

# A step's transient errors, retried within its deadline and its `max_attempts`.
STEP_RETRIES = Backoff(initial_s=0.5, cap_s=30.0, jitter=0.5)
# How often a running job looks for a cancel request: the bound on cancel latency.
CANCEL_POLL_S = 0.5
RELEASE_TIMEOUT_S = 5.0


def longest_safe_block_s(settings: Settings) -> float:
    """How long a step may block its worker's event loop, at any moment, without the worker losing a lease: a
    renewal falls due a third of the TTL after the last one was sent, the keeper sees that within CANCEL_POLL_S, and
    the hold ends at the TTL less the margin. 4.2 s with the default settings (docs/architecture.md)."""
    return settings.lease_ttl_s * 2 / 3 - settings.lease_margin - CANCEL_POLL_S


class Draining(Exception):
    """The worker is stopping: hand the job back instead of starting its next step."""


@dataclass
class Runtime:
    """What the worker process holds for all the jobs it runs."""

    settings: Settings
    leases: Leases
    registry: Registry
    # What each job type's lifespan yielded, by job type name.
    resources: dict[str, Any] = field(default_factory=dict)
    # Set when the worker stops taking jobs; running jobs finish their current step, then hand the job back.
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    # The tasks running jobs now, with their job ids: a stopping worker waits for them, then cancels the rest.
    running: dict[asyncio.Task[Any], str] = field(default_factory=dict)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)


class _Context:
    """The `StepContext` a step receives."""

    def __init__(
        self, leases: Leases, lease: Lease, row: StepRow, resource: Any, settings: Any, state: dict[str, Any]
    ) -> None:
        self.leases = leases
        self.lease = lease
        self.row = row
        self._resource = resource
        self._settings = settings
        self._state = state  # shared by the job's steps in this run
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

    @property
    def settings(self) -> Any:
        return self._settings

    @property
    def state(self) -> Mapping[str, Any]:
        return self._state

    async def remember(self, **values: Any) -> None:
        await self.leases.remember(self.lease, values)
        self._state.update(values)

    async def progress(self, detail: str) -> None:
        if detail != self.last_detail:
            self.last_detail = detail
            await self.leases.progress(self.lease, self.row, detail)


@dataclass(frozen=True)
class _Failure:
    step: str
    error: str


async def run_job(runtime: Runtime, job_id: str) -> Outcome:
    """The arq job: returns what happened, for arq's own log line."""
    if runtime.draining.is_set():
        return Outcome.NOT_CLAIMED_STOPPING
    if not runtime.leases.health.reachable:
        return Outcome.NOT_CLAIMED_UNREACHABLE
    try:
        lease = await runtime.leases.claim(job_id)
    except Exception as exc:
        if not database_unavailable(exc):
            raise
        return Outcome.NOT_CLAIMED_UNREACHABLE  # if the claim did get through, the reaper delivers it once it expires
    if lease is None:
        logger.info("job %s is finished, cancelled or held by another worker; nothing to do", job_id)
        return Outcome.NOT_CLAIMED
    task = asyncio.current_task()
    assert task is not None
    runtime.running[task] = job_id
    try:
        with log_context(job_id=job_id, type=lease.type, attempt=lease.attempt):
            logger.info("claimed job %s (type %s, attempt %d)", job_id, lease.type, lease.attempt)
            if lease.previous_owner is not None:
                runtime.metrics.lease_taken_over(lease.type)
            started = time.perf_counter()
            try:
                job_run = _JobRun(runtime, lease)
            except (UnknownJobType, ValidationError) as exc:
                outcome = await _refuse(runtime, lease, exc)
            else:
                outcome = await _stalled(runtime, lease) or await job_run.run()
            runtime.metrics.job_ran(lease.type, outcome, time.perf_counter() - started)
            logger.info("job %s: %s", job_id, outcome)
            return outcome
    finally:
        runtime.running.pop(task, None)


async def _refuse(runtime: Runtime, lease: Lease, exc: UnknownJobType | ValidationError) -> Outcome:
    """Fail a job this worker cannot run: its type is unknown here (a worker older than the API that took it), or
    its stored params no longer validate (a changed params model, or settings such as the allowed Kubernetes
    contexts). Delivering it again would only repeat this every lease TTL; the error says what to fix, and a
    retry runs it once it is fixed."""
    error = f"this worker cannot run it: {_describe(exc)}"
    logger.error("job %s: %s", lease.job_id, error)
    first = next((row for row in lease.steps if row.order == lease.started_step), None)
    after = Finished(first, StepStatus.FAILED, f"error: {error}") if first is not None else None
    await runtime.leases.finish_job(lease, JobStatus.FAILED, error, after=after)
    return Outcome.FAILED


async def _stalled(runtime: Runtime, lease: Lease) -> Outcome | None:
    """Fail a job whose step keeps blocking its worker's event loop past the lease (as many runs in a row as
    APIOPS_MAX_TAKEOVERS_WITHOUT_PROGRESS, each recorded by its worker): it would otherwise go from worker to worker
    for ever, stalling every job beside it on each. None: run the job (a requested cancel, too, is left to it)."""
    bound = runtime.settings.max_takeovers_without_progress
    step = next((row for row in lease.steps if row.order == lease.started_step), None)
    if lease.previous_owner is None or lease.blocked_runs < bound or step is None:
        return None
    error = (
        f"step {step.name} lost its lease {lease.blocked_runs} times in a row without progress, blocking its worker's "
        f"event loop past the lease each time (APIOPS_MAX_TAKEOVERS_WITHOUT_PROGRESS={bound}); a step must not "
        f"block the loop (no synchronous sleeps, I/O or long computations): fix it, then retry the job"
    )
    logger.error("job %s: %s", lease.job_id, error)
    runtime.metrics.stalled(lease.type)
    after = Finished(step, StepStatus.FAILED, f"error: {error}")
    await runtime.leases.finish_job(lease, JobStatus.FAILED, error, after=after)
    return Outcome.FAILED


class _JobRun:
    def __init__(self, runtime: Runtime, lease: Lease) -> None:
        self.runtime = runtime
        self.leases = runtime.leases
        self.lease = lease
        self.job_type = runtime.registry.get(lease.type)
        self.settings = runtime.registry.settings(lease.type)
        self.params = self.job_type.params.model_validate(
            lease.params, context=runtime.registry.params_context(lease.type)
        )
        self.current: _Context | None = None
        # The step that blocked the event loop past the hold, and for how long: noted in the history once the
        # lease is given up, for the next claims to count.
        self.blocked_past_lease: tuple[str, float] | None = None
        self.state = dict(lease.state)
        # The result of the step that just ended, until the next write records it with itself (one statement per
        # transition). Recording it twice is harmless (see jobs.runtime.leases): it is kept until a write is sure.
        self.unrecorded: Finished | None = None
        # The step the claim started already, until it runs.
        self.claim_started = lease.started_step

    async def run(self) -> Outcome:
        try:
            failure = await self._steps_with_keeper()
            return await self._finish(failure)
        except LeaseLost as exc:
            logger.warning("stopped: %s", exc)
            await self._record_block()
            return Outcome.LEASE_LOST
        except CancelRequested as exc:
            await self._record_cancel(exc)
            return Outcome.CANCELLED
        except Draining:
            await self._release("worker stopping; the job continues on another worker")
            return Outcome.HANDED_BACK
        except asyncio.CancelledError:
            await self._release("worker stopped; the interrupted step will run again")
            raise

    async def _finish(self, failure: _Failure | None) -> Outcome:
        if failure is None:
            await self.leases.finish_job(self.lease, JobStatus.SUCCESS, after=self.unrecorded)
            return Outcome.SUCCESS
        error = f"step {failure.step} failed: {failure.error}"
        await self.leases.finish_job(self.lease, JobStatus.FAILED, error, after=self.unrecorded)
        return Outcome.FAILED

    async def _steps_with_keeper(self) -> _Failure | None:
        """The steps, beside the keeper, under the hold: when it ends (no renewal succeeded in time), the running
        step is cancelled there and then, whatever any statement is waiting for (fencing in time)."""
        hold = self.lease.hold
        self.holding = asyncio.timeout_at(_when(hold.until))
        try:
            async with asyncio.TaskGroup() as group:
                keeper = group.create_task(self._keep_lease())
                async with self.holding:
                    failure = await self._run_steps()
                keeper.cancel()
        except ExceptionGroup as group:
            # Only the steps or the keeper can fail, and the other is then cancelled: surface the one error.
            error = group.exceptions[0]
            if isinstance(error, TimeoutError) and self.holding.expired():
                late = asyncio.get_running_loop().time() - hold.until
                self.runtime.metrics.hold_ended(self.lease.type)
                raise LeaseLost(
                    f"no lease renewal succeeded for {hold.until + late - hold.renewed_sent_at:.1f}s: "
                    "the running step was cancelled before the lease could expire"
                ) from None
            raise error from None
        return failure

    async def _keep_lease(self) -> None:
        """Watch for a cancel request every CANCEL_POLL_S and renew the lease every third of its TTL, moving the
        hold on with each renewal. A statement that fails is tried again (jobs.runtime.leases) until the hold
        ends, which then cancels the steps."""
        ttl = self.runtime.settings.lease_ttl_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                if loop.time() - self.lease.hold.renewed_sent_at >= ttl / 3:
                    await self.leases.renew(self.lease)
                    self.holding.reschedule(_when(self.lease.hold.until))
                else:
                    await self.leases.check(self.lease)
            except (LeaseLost, CancelRequested):
                raise
            except Exception as exc:
                logger.warning("lease check failed, retrying: %s", exc)

    async def _run_steps(self) -> _Failure | None:
        resource = self.runtime.resources.get(self.job_type.name)
        for row in self.lease.steps:
            if row.status in (StepStatus.SUCCESS, StepStatus.SKIPPED):
                continue
            if self.runtime.draining.is_set():
                raise Draining()
            with log_context(step=row.name):
                self.current = _Context(self.leases, self.lease, row, resource, self.settings, self.state)
                started = time.perf_counter()
                error = await self._run_step(self.current, self.job_type.step(row.name))
                elapsed = time.perf_counter() - started
                self.runtime.metrics.step_ran(self.lease.type, row.name, error is not None, elapsed)
                self.current = None
            if error is not None:
                return _Failure(row.name, error)
        return None

    async def _run_step(self, ctx: _Context, step: Step[Any]) -> str | None:
        """Run one step to success or failure (left in `unrecorded`); returns the error text on failure."""
        row = ctx.row
        loop = asyncio.get_running_loop()
        deadline = loop.time() + step.timeout_s
        retries = STEP_RETRIES.retries(deadline=deadline, max_attempts=step.max_attempts)
        while True:
            await self._start(row)
            deadline_cm = asyncio.timeout_at(deadline)
            try:
                async with deadline_cm:
                    detail = await timed(step.run(ctx, self.params), row.name, self._blocked)
            except TimeoutError as exc:
                if not deadline_cm.expired():
                    error = _describe(exc)
                else:
                    waiting = f"; last seen: {ctx.last_detail}" if ctx.last_detail else ""
                    error = f"StepTimeout: no result within {step.timeout_s:g}s{waiting}"
            except step.retry_on as exc:
                delay = retries.failed()
                tries = retries.failures
                if retries.exhausted:
                    error = f"{_describe(exc)} (gave up after {tries} tries)"
                else:
                    logger.warning("step %s try %d failed, retrying in %.1fs: %s", row.name, tries, delay, exc)
                    await ctx.progress(f"try {tries} failed ({_describe(exc)}); retrying in {delay:.1f}s")
                    await asyncio.sleep(delay)
                    continue
            except (LeaseLost, CancelRequested, asyncio.CancelledError):
                raise
            except Exception as exc:
                if isinstance(exc, ExceptionGroup) and (ours := exc.subgroup((LeaseLost, CancelRequested))):
                    raise ours.exceptions[0] from None  # a write of the step's own task group found the job gone
                logger.exception("step %s failed", row.name)
                error = _describe(exc)
            else:
                self.unrecorded = Finished(row, StepStatus.SUCCESS, detail)
                return None
            self.unrecorded = Finished(row, StepStatus.FAILED, f"error: {error}")
            return error

    async def _start(self, row: StepRow) -> None:
        """Start a step, recording the one before it in the same statement (the claim started the first one)."""
        if self.claim_started == row.order:
            self.claim_started = None
            return
        try:
            await self.leases.start_step(self.lease, row, after=self.unrecorded)
        except CancelRequested:
            self.unrecorded = None  # recorded, though the step did not start
            raise
        self.unrecorded = None

    def _blocked(self, step: str, seconds: float) -> None:
        """A stretch of `step` without a yield took `seconds`; past the hold, that block cost the lease."""
        if asyncio.get_running_loop().time() >= self.lease.hold.until:
            self.blocked_past_lease = (step, seconds)

    async def _record_block(self) -> None:
        if self.blocked_past_lease is None:
            return
        step, seconds = self.blocked_past_lease
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                await self.leases.blocked_past_lease(self.lease, step, seconds)
        except Exception as exc:
            logger.warning("could not note the block in the job's history: %s", exc)

    async def _record_cancel(self, request: CancelRequested) -> None:
        if self.unrecorded is not None:
            # The cancel came between two steps: the one that ended is recorded first, as it ended.
            await self.leases.finish_step(self.lease, self.unrecorded)
        step = self.current
        cancelled = None
        if step is not None:
            seen = f"; it was at: {step.last_detail}" if step.last_detail else ""
            cancelled = Finished(step.row, StepStatus.CANCELLED, f"cancelled{seen}")
        await self.leases.finish_job(self.lease, JobStatus.CANCELLED, str(request), after=cancelled)

    async def _release(self, reason: str) -> None:
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                await self.leases.release(self.lease, reason, after=self.unrecorded)
        except Exception as exc:
            logger.warning("could not hand the job back (it is reaped once the lease expires): %s", exc)


def _when(until: float) -> float | None:
    return None if math.isinf(until) else until


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
