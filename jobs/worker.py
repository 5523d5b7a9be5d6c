"""The arq worker: `arq jobs.worker.WorkerSettings`.

Start-up creates the database engine once per process; shutdown disposes it. arq reads settings from this
class's own `__dict__` (inherited attributes are ignored, unknown ones silently dropped), so every value is
spelled out here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from contextlib import AsyncExitStack
from typing import Any

from arq.worker import func

from jobs.engine import Runtime, run_job
from jobs.reaper import reap_forever
from service.db import create_engine, create_sessions
from service.jobtypes import Registry, default_registry
from service.leases import Leases
from service.logs import configure_logging
from service.queue import RUN_JOB, redis_settings
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)

# arq's own timeout only bounds a job whose steps ignore their deadlines; steps time out cooperatively first.
# Its in-progress key lives this long after a SIGKILL, so recovery never waits on it: the reaper re-enqueues.
ARQ_JOB_TIMEOUT_S = 24 * 3600


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


async def startup(ctx: dict[str, Any]) -> None:
    # Tests pass their own settings and registry in arq's initial ctx; the CLI reads the environment.
    settings: Settings = ctx.setdefault("settings", get_settings())
    registry: Registry = ctx.setdefault("registry", default_registry())
    configure_logging(settings)
    engine = create_engine(settings, "worker")
    # Each job type's per-process resources (a Kubernetes ApiClient, ...), closed at shutdown.
    resources = ctx["resources"] = AsyncExitStack()
    opened = {t.name: await resources.enter_async_context(t.lifespan(settings)) for t in registry if t.lifespan}
    owner = worker_id()
    ctx["engine"] = engine
    sessions = create_sessions(engine)
    ctx["runtime"] = Runtime(Leases(sessions, owner, settings.lease_ttl_s), registry, settings.lease_ttl_s, opened)
    ctx["reaper"] = asyncio.create_task(reap_forever(sessions, ctx["redis"], settings), name="apiops-reaper")
    logger.info("worker %s started on queue %s", owner, settings.queue_name)


async def shutdown(ctx: dict[str, Any]) -> None:
    if "reaper" in ctx:
        ctx["reaper"].cancel()
        await asyncio.gather(ctx["reaper"], return_exceptions=True)
    if "resources" in ctx:
        await ctx["resources"].aclose()
    if "engine" in ctx:
        await ctx["engine"].dispose()


async def run(ctx: dict[str, Any], job_id: str) -> str:
    return await run_job(ctx["runtime"], job_id)


_settings = get_settings()


class WorkerSettings:
    functions = [func(run, name=RUN_JOB, timeout=ARQ_JOB_TIMEOUT_S, max_tries=100)]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = redis_settings(_settings)
    queue_name = _settings.queue_name
    max_jobs = _settings.worker_max_jobs
    poll_delay = _settings.worker_poll_delay_s
    keep_result = 0
    health_check_interval = 10
