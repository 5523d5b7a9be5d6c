"""The API's Prometheus metrics (`/metrics`): its own HTTP requests, and the job counts and queue depth.

Counts of jobs come from PostgreSQL and the queue depth from Redis, read when `/metrics` is scraped: every API
replica reports the same figures, right however many workers come and go or die. What only a worker sees (how
long jobs and steps take, lease takeovers, reaper redeliveries) it counts and serves itself
(`jobs.runtime.metrics`).

Every app has a registry of its own, never prometheus_client's global one, so that several apps can live in one
process (the tests make many).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from service.api.repository import count_jobs
from service.api.state import AppState
from service.models import JobStatus

logger = logging.getLogger(__name__)

T = TypeVar("T")

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Any other method becomes "other": a client choosing label values must not be able to grow the series count.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The route label of a request no route matched (a 404, a slash redirect). Real routes all start with "/".
UNMATCHED = "unmatched"


def render(collector: Collector) -> Response:
    return Response(generate_latest(collector), media_type=CONTENT_TYPE_PLAIN_0_0_4)


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
        return render(_Scrape(self.registry, families))


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
        _timed("redis", timeout_s, queue_depth(state)),
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
    async with state.engine.connect() as conn:
        return await count_jobs(conn)


async def queue_depth(state: AppState) -> int:
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
