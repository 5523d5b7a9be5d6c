"""The arq worker: `arq jobs.worker.WorkerSettings`.

Start-up creates the database engine once per process; shutdown disposes it. arq reads settings from this
class's own `__dict__` (inherited attributes are ignored, unknown ones silently dropped), so every value is
spelled out here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import socket
import sys
from contextlib import AsyncExitStack
from typing import Any

from arq.worker import Retry, func

from jobs.registry import REGISTRY
from jobs.runtime.engine import RELEASE_TIMEOUT_S, Runtime, run_job
from jobs.runtime.health import DatabaseHealth
from jobs.runtime.lag import watch_loop_lag
from jobs.runtime.leases import Leases
from jobs.runtime.metrics import MetricsServer, WorkerMetrics
from jobs.runtime.outcome import Outcome
from jobs.runtime.reaper import reap_forever
from service.db import create_engine, create_sessions
from service.heartbeats import beat_forever
from service.jobtypes import Registry
from service.logs import bind_log_context, configure_logging
from service.queue import RUN_JOB, RedisClock, intake_switch, job_of_delivery, redis_settings, use_for_deliveries
from service.settings import Settings, get_settings, settings_or_exit

logger = logging.getLogger(__name__)

# arq's own timeout only bounds a job whose steps ignore their deadlines; steps time out cooperatively first.
# Its in-progress key lives this long after a SIGKILL, so recovery never waits on it: the reaper re-enqueues.
ARQ_JOB_TIMEOUT_S = 24 * 3600


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


async def startup(ctx: dict[str, Any]) -> None:
    # Tests pass their own settings and registry in arq's initial ctx; the CLI reads the environment.
    settings: Settings = ctx.setdefault("settings", get_settings())
    registry: Registry = ctx.setdefault("registry", REGISTRY)
    configure_logging(settings)
    registry.load_settings_or_exit()
    engine = create_engine(settings, "worker", pre_ping=False)
    # Each job type's per-process resources (a Kubernetes ApiClient, ...), closed at shutdown.
    resources = ctx["resources"] = AsyncExitStack()
    opened = {
        t.name: await resources.enter_async_context(t.lifespan(registry.settings(t.name)))
        for t in registry
        if t.lifespan
    }
    owner = worker_id()
    ctx["engine"] = engine
    sessions = create_sessions(engine)
    metrics = WorkerMetrics()
    intake = intake_switch(ctx)
    beat_now = asyncio.Event()

    def database_changed(reachable: bool) -> None:
        metrics.database(reachable)
        intake(reachable)  # no deliveries while PostgreSQL is unreachable: other workers take them
        beat_now.set()  # and the heartbeat says so at once

    health = DatabaseHealth(on_change=database_changed)
    leases = Leases(
        sessions,
        owner,
        settings.lease_ttl_s,
        margin_s=settings.lease_margin,
        statement_timeout_s=settings.lease_statement_timeout_s,
        health=health,
    )
    runtime = ctx["runtime"] = Runtime(settings, leases, registry, opened, metrics=metrics)
    if settings.worker_metrics_port is not None:
        ctx["metrics_server"] = await MetricsServer.start(metrics.registry, settings.host, settings.worker_metrics_port)
    clock = RedisClock()
    try:
        await clock.sync(ctx["redis"])
    except Exception as exc:  # read again with each heartbeat; this machine's clock until then
        logger.warning("could not read Redis' clock yet: %s", exc)
    use_for_deliveries(clock)
    ctx["background"] = [
        asyncio.create_task(
            reap_forever(sessions, ctx["redis"], settings, owner, metrics, health), name="apiops-reaper"
        ),
        asyncio.create_task(
            beat_forever(
                ctx["redis"],
                settings.queue_name,
                owner,
                lambda: sorted(runtime.running.values()),
                status=health.status,
                on_beat=clock.sync,
                beat_now=beat_now,
            ),
            name="apiops-heartbeat",
        ),
        asyncio.create_task(health.watch(leases.ping), name="apiops-database-health"),
        asyncio.create_task(watch_loop_lag(metrics, lambda: sorted(runtime.running.values())), name="apiops-loop-lag"),
    ]
    # on_startup runs inside arq's main task: cancelling it is how a stopping worker ends arq's poll loop.
    ctx["main_task"] = asyncio.current_task()
    if ctx.setdefault("handle_signals", True):
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, begin_shutdown, ctx, signum.name)
    gc.freeze()  # as the API does: what start-up loaded stays, and need not be scanned by every full collection
    logger.info("worker %s started on queue %s", owner, settings.queue_name)


def begin_shutdown(ctx: dict[str, Any], reason: str) -> None:
    """Stop taking jobs; let running steps finish within the grace period, handing each job back instead of
    starting its next step; then cancel what is left (those hand their jobs back too) and end the worker.
    A second request stops at once."""
    runtime: Runtime = ctx["runtime"]
    settings: Settings = ctx["settings"]
    if runtime.draining.is_set():
        logger.warning("%s again: stopping now", reason)
        for task in runtime.running:
            task.cancel()
        return
    runtime.draining.set()
    logger.warning(
        "%s: taking no more jobs; %d running job(s) get %gs to finish their current step, then are handed back",
        reason,
        len(runtime.running),
        settings.shutdown_grace_s,
    )
    ctx["stopping"] = asyncio.create_task(_stop(runtime, ctx["main_task"], settings.shutdown_grace_s))


async def _stop(runtime: Runtime, main_task: asyncio.Task[Any], grace_s: float) -> None:
    running = set(runtime.running)
    if running:
        _, running = await asyncio.wait(running, timeout=grace_s)
    for task in running:
        task.cancel()
    # arq's own task around each job still records the outcome in Redis (a handed-back job is queued again):
    # ending the worker before that would cancel it half-way.
    finishing = {t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Worker.run_job"}  # type: ignore[union-attr]
    if finishing:
        await asyncio.wait(finishing, timeout=RELEASE_TIMEOUT_S + 1)
    main_task.cancel()


async def shutdown(ctx: dict[str, Any]) -> None:
    for task in ctx.get("background", []):
        task.cancel()
    await asyncio.gather(*ctx.get("background", []), return_exceptions=True)
    if "resources" in ctx:
        await ctx["resources"].aclose()
    if "engine" in ctx:
        await ctx["engine"].dispose()
    if "metrics_server" in ctx:
        await ctx["metrics_server"].stop()


async def on_job_start(ctx: dict[str, Any]) -> None:
    # In the task arq runs the delivery in, before arq's own lines about it: those name the job too.
    bind_log_context(job_id=job_of_delivery(ctx["job_id"]))


async def run(ctx: dict[str, Any], job_id: str) -> str:
    runtime: Runtime = ctx["runtime"]
    if runtime.draining.is_set():
        # Back to the queue for a worker that is not stopping; this one will not claim it.
        raise Retry(defer=1)
    outcome = await run_job(runtime, job_id)
    if outcome is Outcome.HANDED_BACK:
        raise Retry(defer=0)  # queued again at once, for another worker to resume
    if outcome is Outcome.NOT_CLAIMED_UNREACHABLE:
        # Back to the queue at once, for a worker that reaches PostgreSQL: this one takes no more meanwhile.
        runtime.metrics.handed_back()
        raise Retry(defer=0)
    return outcome.value  # arq logs the result's repr: the plain word reads better than the enum member's repr


_settings = settings_or_exit("worker")
# Now, not at start-up: arq connects to Redis before it starts the worker, and says nothing while it cannot.
configure_logging(_settings)


def install_event_loop() -> None:
    """uvloop's policy, so that the loop arq creates (asyncio.get_event_loop(), just after importing this module)
    is uvloop's, as the API's is under uvicorn: the worker spent about 15% less CPU per job on it (`make bench`)."""
    if sys.platform != "win32":  # where uvloop is built (pyproject.toml)
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


install_event_loop()


class WorkerSettings:
    functions = [func(run, name=RUN_JOB, timeout=ARQ_JOB_TIMEOUT_S, max_tries=100)]
    on_startup = startup
    on_shutdown = shutdown
    on_job_start = on_job_start
    redis_settings = redis_settings(_settings)
    queue_name = _settings.queue_name
    max_jobs = _settings.worker_max_jobs
    poll_delay = _settings.worker_poll_delay_s
    keep_result = 0
    # `arq --check jobs.worker.WorkerSettings` reads the key this refreshes (GET /ops/workers is per worker).
    health_check_interval = 5
    # The worker handles SIGINT/SIGTERM itself (begin_shutdown): arq's handlers give running jobs no warning.
    handle_signals = False
