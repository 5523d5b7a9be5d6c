"""Cancel and retry, each one statement: what they leave in the rows, with a job held by a lease and no worker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from jobs.runtime.leases import Finished, Lease, Leases
from service.db import create_engine, create_sessions
from service.models import JobStatus, StepStatus
from service.settings import Settings
from tests.conftest import fetch_one, headers, submit


@pytest.fixture
async def leases(settings: Settings) -> AsyncIterator[Leases]:
    engine: AsyncEngine = create_engine(settings, "test")
    yield Leases(create_sessions(engine), "worker-a", ttl_s=30)
    await engine.dispose()


async def _running(client: httpx.AsyncClient, leases: Leases, steps: int = 3) -> Lease:
    lease = await leases.claim(await submit(client, steps=steps))
    assert lease is not None and lease.started_step == 1
    return lease


async def _kinds(db: asyncpg.Connection, job_id: str) -> list[str]:
    rows = await db.fetch("SELECT kind FROM ops_job_event WHERE job_id = $1 ORDER BY event_id", job_id)
    return [row["kind"] for row in rows]


async def test_cancelling_a_running_job_flags_it_once_and_answers_with_the_job(
    client: httpx.AsyncClient, leases: Leases, db: asyncpg.Connection
) -> None:
    lease = await _running(client, leases)

    first = await client.post(f"/ops/jobs/{lease.job_id}/cancel")
    again = await client.post(f"/ops/jobs/{lease.job_id}/cancel", headers=headers("admin"))

    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json() == (await client.get(f"/ops/jobs/{lease.job_id}")).json()
    assert first.json()["status"] == "running" and first.json()["finished_at"] is None
    row = await fetch_one(db, "SELECT cancel_requested_at, error FROM ops_job WHERE job_id = $1", lease.job_id)
    assert row["cancel_requested_at"] is not None and row["error"] is None
    assert (await _kinds(db, lease.job_id)).count("cancel_requested") == 1, "asking again changes nothing"
    event = await fetch_one(
        db,
        "SELECT status, actor, attempt FROM ops_job_event WHERE job_id = $1 AND kind = 'cancel_requested'",
        lease.job_id,
    )
    assert event == {"status": "running", "actor": "writer", "attempt": None}


async def test_retry_makes_the_unfinished_steps_pending_and_clears_the_outcome(
    client: httpx.AsyncClient, leases: Leases, db: asyncpg.Connection
) -> None:
    lease = await _running(client, leases)
    first, second, _ = lease.steps
    await leases.start_step(lease, second, after=Finished(first, StepStatus.SUCCESS, "ok"))
    await leases.finish_job(lease, JobStatus.FAILED, "boom", after=Finished(second, StepStatus.FAILED, "broke"))

    response = await client.post(f"/ops/jobs/{lease.job_id}/retry")

    assert response.status_code == 202
    job = response.json()
    assert job == (await client.get(f"/ops/jobs/{lease.job_id}")).json()
    assert (job["status"], job["error"], job["finished_at"], job["attempt"]) == ("pending", None, None, 1)
    assert [(s["status"], s["detail"]) for s in job["steps"]] == [
        ("success", "ok"),
        ("pending", "broke"),
        ("pending", None),
    ]
    row = await fetch_one(db, "SELECT cancel_requested_at, lease_owner FROM ops_job WHERE job_id = $1", lease.job_id)
    assert row == {"cancel_requested_at": None, "lease_owner": None}
    assert (await _kinds(db, lease.job_id))[-1] == "retried"


async def test_retry_of_a_cancelled_job_clears_the_cancel_request(
    client: httpx.AsyncClient, leases: Leases, db: asyncpg.Connection
) -> None:
    lease = await _running(client, leases, steps=2)
    assert (await client.post(f"/ops/jobs/{lease.job_id}/cancel")).status_code == 202
    first, _ = lease.steps
    await leases.finish_job(lease, JobStatus.CANCELLED, "cancelled", after=Finished(first, StepStatus.CANCELLED, None))

    retried = await client.post(f"/ops/jobs/{lease.job_id}/retry")

    assert retried.status_code == 202
    assert [s["status"] for s in retried.json()["steps"]] == ["pending", "pending"]
    assert await db.fetchval("SELECT cancel_requested_at FROM ops_job WHERE job_id = $1", lease.job_id) is None
    again = await leases.claim(lease.job_id)
    assert again is not None and again.started_step == 1, "a cancel request that was answered does not stop it again"


async def test_retry_of_another_actors_job_is_refused_with_nothing_written(
    client: httpx.AsyncClient, leases: Leases, db: asyncpg.Connection
) -> None:
    lease = await _running(client, leases, steps=1)
    await leases.finish_job(lease, JobStatus.FAILED, "boom", after=Finished(lease.steps[0], StepStatus.FAILED, None))
    await db.execute("UPDATE ops_job SET actor = 'someone-else' WHERE job_id = $1", lease.job_id)
    events = await _kinds(db, lease.job_id)

    refused = await client.post(f"/ops/jobs/{lease.job_id}/retry")

    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == (
        f"job {lease.job_id} belongs to 'someone-else'; only a key with jobs:admin may retry another actor's job"
    )
    assert await db.fetchval("SELECT status FROM ops_job WHERE job_id = $1", lease.job_id) == "failed"
    assert await _kinds(db, lease.job_id) == events
    assert (await client.post(f"/ops/jobs/{lease.job_id}/retry", headers=headers("admin"))).status_code == 202
    assert (await client.post("/ops/jobs/noop-nope/retry")).status_code == 404
