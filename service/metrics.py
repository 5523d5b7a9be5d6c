"""Prometheus metrics: the API's `/metrics` and each worker's own.

Counts of jobs come from PostgreSQL and the queue depth from Redis, read when the API's `/metrics` is scraped:
every API replica reports the same figures, right however many workers come and go or die. What only a worker
sees (how long jobs and steps take, lease takeovers, reaper redeliveries) it counts itself and serves on
`APIOPS_WORKER_METRICS_PORT`; Prometheus sums the workers. The API also measures its own HTTP requests.

Every app and every worker has a registry of its own, never prometheus_client's global one, so that several
apps and workers can live in one process (the tests make many).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Iterable, Iterator
from typing import TypeVar

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from service.models import Job, JobStatus
from service.state import AppState

logger = logging.getLogger(__name__)

T = TypeVar("T")

# From a no-op step (milliseconds) to a pg-rebuild waiting for a replica to re-clone (an hour).
JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Any other method becomes "other": a client choosing label values must not be able to grow the series count.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The route label of a request no route matched (a 404, a slash redirect). Real routes all start with "/".
UNMATCHED = "unmatched"
_FINISHED = frozenset(s.value for s in JobStatus if s.finished)
_REDELIVERY_REASONS = {JobStatus.PENDING: "pending_not_queued", JobStatus.RUNNING: "lease_expired"}


def _render(collector: Collector) -> Response:
    return Response(generate_latest(collector), media_type=CONTENT_TYPE_PLAIN_0_0_4)


# The API.


class ApiMetrics:
    """One app's metrics: its HTTP requests, plus the job and queue figures read at each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "apiops_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "apiops_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, scope: Scope, status: int, seconds: float) -> None:
        """Counted under the route template (`/ops/jobs/{name}`), never the raw path, which would make a series per
        job id. Starlette's router records the route it chose in the scope (a 405 too); nothing for a 404."""
        route = getattr(scope.get("route"), "path", None) or UNMATCHED
        method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def route(self) -> Route:
        # No auth, like the probes: it tells counts, never params, actors or targets.
        return Route("/metrics", self.endpoint, methods=["GET"])

    async def endpoint(self, request: Request) -> Response:
        families = await read_sources(AppState.of(request))
        return _render(_Scrape(self.registry, families))


class _Scrape:
    """The app's registry and the families just read from PostgreSQL and Redis, rendered as one exposition.
    Each scrape renders its own families, so concurrent scrapes share no mutable state."""

    def __init__(self, registry: CollectorRegistry, families: list[Metric]) -> None:
        self._registry = registry
        self._families = families

    def collect(self) -> Iterable[Metric]:
        yield from self._registry.collect()
        yield from self._families


async def read_sources(state: AppState) -> list[Metric]:
    """Job counts and queue depth, each source under the readiness timeout: a slow PostgreSQL or Redis leaves
    its figures out of this scrape (and says so in `apiops_metrics_source_up`) instead of hanging it."""
    timeout_s = state.settings.readiness_timeout_s
    counts, depth = await asyncio.gather(
        _timed("postgres", timeout_s, _job_counts(state)),
        _timed("redis", timeout_s, _queue_depth(state)),
    )
    up = GaugeMetricFamily(
        "apiops_metrics_source_up", "1 if the source answered this scrape within its timeout", labels=["source"]
    )
    took = GaugeMetricFamily(
        "apiops_metrics_source_duration_seconds", "Time this scrape spent reading the source", labels=["source"]
    )
    families: list[Metric] = [up, took]
    for source, (value, seconds) in (("postgres", counts), ("redis", depth)):
        up.add_metric([source], 0 if value is None else 1)
        took.add_metric([source], seconds)
    if counts[0] is not None:
        families += job_families(counts[0], [t.name for t in state.registry])
    if depth[0] is not None:
        families.append(GaugeMetricFamily("apiops_queue_depth", "Deliveries waiting in the arq queue", depth[0]))
    return families


async def _timed(source: str, timeout_s: float, read: Awaitable[T]) -> tuple[T | None, float]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            value: T | None = await read
    except Exception as exc:
        logger.warning("metrics: could not read %s, its figures are left out of this scrape: %r", source, exc)
        value = None
    return value, time.perf_counter() - started


async def _job_counts(state: AppState) -> list[tuple[str, str, int]]:
    # One pass over ops_job whatever its size; grouped in PostgreSQL, so only a few rows come back.
    async with state.engine.connect() as conn:
        rows = await conn.execute(select(Job.type, Job.status, func.count()).group_by(Job.type, Job.status))
        return [(row[0], row[1], row[2]) for row in rows]


async def _queue_depth(state: AppState) -> int:
    # arq's queue is a sorted set of delivery ids (deferred ones included).
    return int(await state.redis.zcard(state.settings.queue_name))


def job_families(counts: Iterable[tuple[str, str, int]], known_types: Iterable[str]) -> list[Metric]:
    """`apiops_jobs` and `apiops_jobs_created_total` from counts by (type, status). Every known type and status
    is there, zero included, so that a rule can tell "none" from "not reported"."""
    by_key = {(name, status.value): 0 for name in known_types for status in JobStatus}
    for job_type, status, count in counts:
        by_key[(job_type, status)] = count
    jobs = GaugeMetricFamily(
        "apiops_jobs",
        "Jobs by type and current status (PostgreSQL): running now, waiting, and finished by outcome",
        labels=["type", "status"],
    )
    created: Tally[str] = Tally()
    for (job_type, status), count in sorted(by_key.items()):
        jobs.add_metric([job_type, status], count)
        created[job_type] += count
    # Rows are never deleted, so the number of rows per type only grows: a counter.
    created_total = CounterMetricFamily("apiops_jobs_created", "Jobs ever submitted, by type", labels=["type"])
    for job_type, count in sorted(created.items()):
        created_total.add_metric([job_type], count)
    return [jobs, created_total]


# The worker.


class WorkerMetrics:
    """What one worker observes of the jobs it runs. Counts are this worker's since it started."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.job_duration = Histogram(
            "apiops_job_duration_seconds",
            "Time from claim to end of the job runs this worker finished, by type and final status",
            ["type", "status"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.step_duration = Histogram(
            "apiops_step_duration_seconds",
            "Time a step took, retries included, by type, step and outcome (success or failed)",
            ["type", "step", "status"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.lease_takeovers = Counter(
            "apiops_lease_takeovers",
            "Jobs this worker claimed from a worker whose lease had expired, by type",
            ["type"],
            registry=self.registry,
        )
        self.redeliveries = Counter(
            "apiops_reaper_redeliveries",
            "Jobs this worker's reaper put back on the queue: pending_not_queued or lease_expired",
            ["reason"],
            registry=self.registry,
        )
        for reason in _REDELIVERY_REASONS.values():
            self.redeliveries.labels(reason)

    def job_ran(self, job_type: str, outcome: str, seconds: float) -> None:
        """Only runs that finished the job count; one that lost its lease or was handed back ends elsewhere."""
        if outcome in _FINISHED:
            self.job_duration.labels(job_type, outcome).observe(seconds)

    def step_ran(self, job_type: str, step: str, failed: bool, seconds: float) -> None:
        self.step_duration.labels(job_type, step, "failed" if failed else "success").observe(seconds)

    def lease_taken_over(self, job_type: str) -> None:
        self.lease_takeovers.labels(job_type).inc()

    def redelivered(self, statuses: Iterable[JobStatus]) -> None:
        for status in statuses:
            self.redeliveries.labels(_REDELIVERY_REASONS.get(status, status.value)).inc()


class _LoopServer(uvicorn.Server):
    """uvicorn as one more task of the worker's loop. The worker handles SIGINT/SIGTERM itself (a graceful
    drain), so uvicorn must not install its own handlers over them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MetricsServer:
    """A worker's `/metrics`, served over HTTP by uvicorn inside the worker's event loop (no thread)."""

    STARTUP_TIMEOUT_S = 5.0

    def __init__(self, server: _LoopServer, task: asyncio.Task[None]) -> None:
        self._server = server
        self._task = task

    @classmethod
    async def start(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
        async def endpoint(request: Request) -> Response:
            return _render(registry)

        app = Starlette(routes=[Route("/metrics", endpoint, methods=["GET"])])
        # Bound here rather than by uvicorn, which answers a port in use with sys.exit: the worker's start-up
        # fails with the OSError instead.
        family = (await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM))[0][0]
        sock = socket.create_server((host, port), family=family)
        config = uvicorn.Config(
            app, log_config=None, lifespan="off", ws="none", access_log=False, timeout_graceful_shutdown=1
        )
        server = _LoopServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="apiops-worker-metrics")
        try:
            async with asyncio.timeout(cls.STARTUP_TIMEOUT_S):
                while not server.started:
                    if task.done():
                        task.result()
                        raise RuntimeError("the metrics server stopped during start-up")
                    await asyncio.sleep(0.01)
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            sock.close()
            raise
        logger.info("worker metrics on http://%s:%d/metrics", host, port)
        return cls(server, task)

    async def stop(self) -> None:
        self._server.should_exit = True
        try:
            async with asyncio.timeout(5):
                await self._task
        except TimeoutError:
            logger.warning("the metrics server did not stop within 5s")
