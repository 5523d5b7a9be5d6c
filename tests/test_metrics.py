"""Prometheus metrics: the API's `/metrics` (job counts from PostgreSQL, queue depth from Redis, HTTP requests)
and each worker's own `/metrics` over real HTTP (job and step durations, lease takeovers, reaper redeliveries)."""

from __future__ import annotations

import socket
import time

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from starlette.routing import Match, Route

from jobs.runtime.leases import Leases
from jobs.runtime.metrics import MetricsServer, WorkerMetrics
from service.api.app import create_app
from service.api.metrics import UNMATCHED
from service.db import create_engine, create_sessions
from service.settings import Settings
from tests.conftest import (
    TEST_REGISTRY,
    api_client,
    free_port,
    headers,
    running_worker,
    submit,
    wait_for,
    wait_for_status,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


async def scrape_worker(port: int) -> Samples:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


async def test_job_counts_match_the_jobs_run_by_type_and_status(client: httpx.AsyncClient, settings: Settings) -> None:
    async with running_worker(settings):
        ids = [await submit(client, steps=2) for _ in range(3)]
        ids += [await submit(client, steps=2, fail_at_step=2) for _ in range(2)]
        for job_id in ids:
            await wait_for_status(client, job_id, "success", "failed")

    samples = await scrape(client)

    assert value(samples, "apiops_jobs_created_total", type="noop") == 5
    assert value(samples, "apiops_jobs", type="noop", status="success") == 3
    assert value(samples, "apiops_jobs", type="noop", status="failed") == 2
    for status in ("pending", "running", "cancelled"):
        assert value(samples, "apiops_jobs", type="noop", status=status) == 0
    # Every registered type is reported, at zero when it has no jobs: "none" is not "unknown".
    assert value(samples, "apiops_jobs_created_total", type="pg-rebuild") == 0
    assert value(samples, "apiops_jobs", type="pg-rebuild", status="running") == 0
    assert value(samples, "apiops_queue_depth") == 0
    assert value(samples, "apiops_metrics_source_up", source="postgres") == 1
    assert value(samples, "apiops_metrics_source_up", source="redis") == 1


async def test_pending_jobs_show_in_the_queue_depth(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        await submit(client)

    samples = await scrape(client)

    assert value(samples, "apiops_queue_depth") == 2
    assert value(samples, "apiops_jobs", type="noop", status="pending") == 2


async def test_metric_types_are_declared(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}

    assert families["apiops_jobs"] == "gauge"
    assert families["apiops_jobs_created"] == "counter"
    assert families["apiops_queue_depth"] == "gauge"
    assert families["apiops_http_requests"] == "counter"
    assert families["apiops_http_request_duration_seconds"] == "histogram"


def app_routes(settings: Settings) -> list[Route]:
    return [route for route in create_app(settings, TEST_REGISTRY).routes if isinstance(route, Route)]


def route_template(settings: Settings, method: str, path: str) -> str:
    """The template of the route Starlette's router picks for a request, as it picks it (a full match first,
    else the first partial one: a 405)."""
    partial = None
    for route in app_routes(settings):
        match, _ = route.matches({"type": "http", "path": path, "method": method, "root_path": ""})
        if match is Match.FULL:
            return route.path
        if match is Match.PARTIAL and partial is None:
            partial = route.path
    assert partial is not None, f"no route for {method} {path}"
    return partial


async def test_http_requests_are_counted_by_route_template_and_status(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    first, second = await submit(client), await submit(client)
    await client.get(f"/ops/jobs/{first}")
    await client.get(f"/ops/jobs/{second}")
    await client.get("/ops/jobs/noop-does-not-exist")
    await client.get("/no/such/route")
    await client.delete(f"/ops/jobs/{first}")
    await client.get("/ops/jobs", headers=headers("reader"))

    samples = await scrape(client)

    def requests(method: str, route: str, status: str) -> float | None:
        return value(samples, "apiops_http_requests_total", method=method, route=route, status=status)

    read = route_template(settings, "GET", f"/ops/jobs/{first}")
    assert read.startswith("/ops/jobs/{") and read.endswith("}")
    assert requests("POST", route_template(settings, "POST", "/ops/jobs/noop"), "202") == 2
    assert requests("GET", read, "200") == 2
    assert requests("GET", read, "404") == 1
    assert requests("DELETE", route_template(settings, "DELETE", f"/ops/jobs/{first}"), "405") == 1
    assert requests("GET", "/ops/jobs", "200") == 1
    assert requests("GET", UNMATCHED, "404") == 1
    assert value(samples, "apiops_http_request_duration_seconds_count", method="GET", route=read) == 3
    # Bounded cardinality: every route label is a declared template, whatever paths clients send.
    declared = {route.path for route in app_routes(settings)} | {UNMATCHED}
    labelled = {dict(labels)["route"] for name, labels in samples if name == "apiops_http_requests_total"}
    assert labelled <= declared


async def test_worker_serves_step_and_job_duration_histograms(client: httpx.AsyncClient, settings: Settings) -> None:
    port = free_port()
    async with running_worker(settings.model_copy(update={"worker_metrics_port": port})):
        ids = [await submit(client, steps=2) for _ in range(2)]
        ids.append(await submit(client, steps=3, fail_at_step=2))
        for job_id in ids:
            await wait_for_status(client, job_id, "success", "failed")

        async def recorded() -> Samples | None:
            # The worker records a job's duration just after committing its end, which the API may see first.
            samples = await scrape_worker(port)
            done = value(samples, "apiops_job_duration_seconds_count", type="noop", status="failed")
            return samples if done == 1 else None

        samples = await wait_for(recorded, within=2)

    def steps(step: str, status: str) -> float | None:
        return value(samples, "apiops_step_duration_seconds_count", type="noop", step=step, status=status)

    assert steps("step-1", "success") == 3
    assert steps("step-2", "success") == 2
    assert steps("step-2", "failed") == 1
    assert steps("step-3", "success") is None and steps("step-3", "failed") is None
    assert value(samples, "apiops_job_duration_seconds_count", type="noop", status="success") == 2
    job_inf = value(samples, "apiops_job_duration_seconds_bucket", type="noop", status="success", le="+Inf")
    assert job_inf == 2
    assert value(samples, "apiops_job_duration_seconds_bucket", type="noop", status="success", le="3600.0") == 2
    assert (value(samples, "apiops_job_duration_seconds_sum", type="noop", status="success") or 0) > 0
    assert value(samples, "apiops_reaper_redeliveries_total", reason="lease_expired") == 0
    # The worker stopped its server with itself.
    with pytest.raises(httpx.ConnectError):
        await scrape_worker(port)


async def test_a_taken_metrics_port_fails_the_worker_start() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await MetricsServer.start(WorkerMetrics().registry, "127.0.0.1", port)


async def test_lease_takeover_and_reaper_redelivery_are_counted_by_the_worker(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection, redis: Redis
) -> None:
    job_id = await submit(client, steps=2)
    # A worker claims the job (starting its first step) and dies: its lease expires and nothing is left in the queue.
    engine = create_engine(settings, "dead-worker")
    try:
        dead = Leases(create_sessions(engine), "dead-worker", ttl_s=1)
        assert await dead.claim(job_id) is not None
    finally:
        await engine.dispose()
    await redis.delete(settings.queue_name)
    await db.execute("UPDATE ops_job SET lease_expires_at = now() - interval '1 second' WHERE job_id = $1", job_id)

    port = free_port()
    rescuer = settings.model_copy(update={"reaper_interval_s": 0.2, "worker_metrics_port": port})
    async with running_worker(rescuer):
        await wait_for_status(client, job_id, "success", within=5)

        async def recorded() -> Samples | None:
            samples = await scrape_worker(port)
            return samples if value(samples, "apiops_lease_takeovers_total", type="noop") == 1 else None

        samples = await wait_for(recorded, within=2)

    assert value(samples, "apiops_reaper_redeliveries_total", reason="lease_expired") == 1
    assert value(samples, "apiops_reaper_redeliveries_total", reason="pending_not_queued") == 0
    assert value(samples, "apiops_step_duration_seconds_count", type="noop", step="step-1", status="success") == 1


async def test_an_unreachable_redis_leaves_only_its_figures_out(settings: Settings) -> None:
    no_redis = settings.model_copy(
        update={"redis_url": Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0").redis_url}
    )
    async with api_client(no_redis) as client:
        samples = await scrape(client)

    assert value(samples, "apiops_metrics_source_up", source="redis") == 0
    assert value(samples, "apiops_metrics_source_up", source="postgres") == 1
    assert value(samples, "apiops_queue_depth") is None
    assert value(samples, "apiops_jobs_created_total", type="noop") == 0


async def test_counts_stay_right_and_cheap_with_many_jobs(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    await db.execute(
        """
        INSERT INTO ops_job (job_id, type, status, params, actor, created_at, finished_at)
        SELECT 'noop-bulk-' || n, CASE WHEN n % 4 = 0 THEN 'pg-rebuild' ELSE 'noop' END,
               CASE WHEN n % 10 = 0 THEN 'failed' ELSE 'success' END, '{}', 'bulk',
               now() - n * interval '1 second', now()
        FROM generate_series(1, 100000) AS n
        """
    )
    await db.execute("ANALYZE ops_job")
    await scrape(client)  # the first scrape also opens the pool's connection

    started = time.perf_counter()
    samples = await scrape(client)
    took = time.perf_counter() - started

    assert value(samples, "apiops_jobs_created_total", type="noop") == 75000
    assert value(samples, "apiops_jobs_created_total", type="pg-rebuild") == 25000
    assert value(samples, "apiops_jobs", type="noop", status="failed") == 5000
    assert value(samples, "apiops_jobs", type="pg-rebuild", status="failed") == 5000
    assert value(samples, "apiops_jobs", type="noop", status="success") == 70000
    assert took < 0.5, f"a scrape over 100,000 jobs took {took:.3f}s"
