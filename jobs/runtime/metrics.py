"""A worker's own Prometheus metrics, served on `APIOPS_WORKER_METRICS_PORT`: what only a worker sees.

How long the jobs and steps it ran took, the leases it took over, its reaper's redeliveries. Counts are this
worker's since it started; Prometheus sums the workers. Job counts and queue depth are the API's to report
(`service.api.metrics`). Every worker has a registry of its own, never prometheus_client's global one, so that
several workers can live in one process (the tests make many).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterable, Iterator

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs.runtime.outcome import Outcome
from service.models import JobStatus

logger = logging.getLogger(__name__)

# From a no-op step (milliseconds) to a pg-rebuild waiting for a replica to re-clone (an hour).
JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_REDELIVERY_REASONS = {JobStatus.PENDING: "pending_not_queued", JobStatus.RUNNING: "lease_expired"}


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
        self.holds_ended = Counter(
            "apiops_lease_holds_ended",
            "Steps this worker cancelled because no lease renewal succeeded in time (the lease could expire), by type",
            ["type"],
            registry=self.registry,
        )
        self.database_reachable = Gauge(
            "apiops_worker_database_reachable",
            "1 while this worker reaches PostgreSQL (and takes jobs), 0 while it cannot",
            registry=self.registry,
        )
        self.database_reachable.set(1)
        self.deliveries_handed_back = Counter(
            "apiops_worker_deliveries_handed_back",
            "Deliveries this worker put straight back on the queue because it could not reach PostgreSQL",
            registry=self.registry,
        )
        self.loop_blocked = Counter(
            "apiops_worker_event_loop_blocked",
            "Times this worker's event loop was blocked for longer than the lag monitor allows",
            registry=self.registry,
        )
        self.loop_blocked_seconds = Counter(
            "apiops_worker_event_loop_blocked_seconds",
            "Seconds this worker's event loop spent blocked, counted from the blocks the lag monitor saw",
            registry=self.registry,
        )
        self.stalled_jobs = Counter(
            "apiops_jobs_failed_stalled",
            "Jobs this worker failed because their step kept losing its lease without progress, by type",
            ["type"],
            registry=self.registry,
        )

    def job_ran(self, job_type: str, outcome: Outcome, seconds: float) -> None:
        """Only runs that finished the job count; one that lost its lease or was handed back ends elsewhere."""
        if outcome.status is not None:
            self.job_duration.labels(job_type, outcome.status.value).observe(seconds)

    def step_ran(self, job_type: str, step: str, failed: bool, seconds: float) -> None:
        self.step_duration.labels(job_type, step, "failed" if failed else "success").observe(seconds)

    def lease_taken_over(self, job_type: str) -> None:
        self.lease_takeovers.labels(job_type).inc()

    def hold_ended(self, job_type: str) -> None:
        self.holds_ended.labels(job_type).inc()

    def database(self, reachable: bool) -> None:
        self.database_reachable.set(1 if reachable else 0)

    def handed_back(self) -> None:
        self.deliveries_handed_back.inc()

    def blocked(self, seconds: float) -> None:
        self.loop_blocked.inc()
        self.loop_blocked_seconds.inc(seconds)

    def stalled(self, job_type: str) -> None:
        self.stalled_jobs.labels(job_type).inc()

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
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

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
