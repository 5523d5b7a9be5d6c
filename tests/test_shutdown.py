"""A stopping worker hands jobs back; a worker that lost its lease stops working on the job; one that lost its
connections to PostgreSQL goes on."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from jobs.worker import begin_shutdown
from service.settings import Settings
from tests.conftest import fetch_one, running_worker, wait_for, wait_for_status


async def test_stopping_worker_finishes_the_running_step_then_hands_the_job_back(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 3, "sleep_s": 0.6})).json()["job_id"]

    async with running_worker(settings) as worker:
        await wait_for_status(client, job_id, "running")
        begin_shutdown(worker.ctx, "SIGTERM")
        assert worker.main_task is not None
        await asyncio.wait([worker.main_task], timeout=5)

        handed_back = await fetch_one(db, "SELECT status, lease_owner FROM ops_job WHERE job_id = $1", job_id)
        assert handed_back == {"status": "pending", "lease_owner": None}
        steps = await db.fetch("SELECT status, attempts FROM ops_job_step WHERE job_id = $1 ORDER BY 1", job_id)
        # The step that was running finished; the next one was not started.
        assert [(s["status"], s["attempts"]) for s in steps] == [("pending", 0), ("pending", 0), ("success", 1)]

    async with running_worker(settings):
        job = await wait_for_status(client, job_id, "success", "failed", within=5)

    assert job["attempt"] == 2
    assert [s["attempts"] for s in job["steps"]] == [1, 1, 1], "no step ran twice"


async def test_grace_period_over_cancels_the_step_and_hands_the_job_back(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    short_grace = settings.model_copy(update={"shutdown_grace_s": 0.3})
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 2, "sleep_s": 30})).json()["job_id"]

    async with running_worker(short_grace) as worker:
        await wait_for_status(client, job_id, "running")
        stopped = time.monotonic()
        begin_shutdown(worker.ctx, "SIGTERM")
        assert worker.main_task is not None
        await asyncio.wait([worker.main_task], timeout=5)
        elapsed = time.monotonic() - stopped

    assert elapsed < 2
    job = await fetch_one(db, "SELECT status, lease_owner FROM ops_job WHERE job_id = $1", job_id)
    assert job == {"status": "pending", "lease_owner": None}
    first = await fetch_one(db, "SELECT status, detail FROM ops_job_step WHERE job_id = $1 AND step_order = 1", job_id)
    assert first == {"status": "pending", "detail": "worker stopped; the interrupted step will run again"}


async def test_worker_that_loses_its_lease_stops_the_job(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 2, "sleep_s": 3})).json()["job_id"]

    async with running_worker(settings) as worker:

        async def sleeping() -> bool:
            job = (await client.get(f"/ops/jobs/{job_id}")).json()
            return bool(job["steps"][0]["detail"] == "sleeping 3s")

        await wait_for(sleeping)
        # Another worker took the job over (as after an expired lease).
        await db.execute(
            "UPDATE ops_job SET attempt = attempt + 1, lease_owner = 'thief', lease_expires_at = now() + '1 hour'"
            " WHERE job_id = $1",
            job_id,
        )
        runtime = worker.ctx["runtime"]

        async def stopped() -> bool:
            return not runtime.running

        started = time.monotonic()
        await wait_for(stopped, within=3)
        assert time.monotonic() - started < 1.5

    row = await fetch_one(db, "SELECT status, lease_owner FROM ops_job WHERE job_id = $1", job_id)
    assert row == {"status": "running", "lease_owner": "thief"}
    step = await fetch_one(db, "SELECT status, detail FROM ops_job_step WHERE job_id = $1 AND step_order = 1", job_id)
    assert step == {"status": "running", "detail": "sleeping 3s"}, "the old worker wrote after losing its lease"


async def test_a_job_goes_on_after_postgres_dropped_the_workers_connections(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """As after a PostgreSQL restart while steps run: the worker's pooled connections are dead. Its next writes
    retry on new ones, and the job ends as if nothing had happened. A dead connection is dropped, not tried again:
    each costs one retry at most."""
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 3, "sleep_s": 0.5})).json()["job_id"]

    async with running_worker(settings):
        await wait_for_status(client, job_id, "running")
        dropped = await db.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'apiops-worker'"
        )
        job = await wait_for_status(client, job_id, "success", "failed", within=5)

    assert dropped >= 1
    assert job["status"] == "success"
    assert job["attempt"] == 1, "the worker kept its lease"
    assert [s["attempts"] for s in job["steps"]] == [1, 1, 1]
    retries = [r for r in caplog.records if r.name == "jobs.runtime.leases" and "unreachable" in r.getMessage()]
    assert len(retries) <= dropped
