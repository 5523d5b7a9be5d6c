"""Leases: one holder per job at a time, fenced writes, release on shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from jobs.runtime.leases import Finished, LeaseLost, Leases
from service.db import create_engine, create_sessions
from service.models import JobStatus, StepStatus
from service.settings import Settings
from tests.conftest import fetch_one, job_summary, read_job, running_worker, submit, wait_for, wait_for_status


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings, "test")
    yield engine
    await engine.dispose()


async def test_live_lease_cannot_be_claimed_again(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    job_id = await submit(client)
    first = Leases(create_sessions(engine), "worker-a", ttl_s=30)
    second = Leases(create_sessions(engine), "worker-b", ttl_s=30)

    lease = await first.claim(job_id)

    assert lease is not None and lease.attempt == 1
    assert await second.claim(job_id) is None


async def test_expired_lease_is_taken_over_and_the_old_holder_is_fenced_off(
    client: httpx.AsyncClient, engine: AsyncEngine, db: asyncpg.Connection
) -> None:
    job_id = await submit(client)
    old = Leases(create_sessions(engine), "worker-a", ttl_s=30)
    new = Leases(create_sessions(engine), "worker-b", ttl_s=30)
    old_lease = await old.claim(job_id)
    assert old_lease is not None
    await db.execute("UPDATE ops_job SET lease_expires_at = now() - interval '1 second' WHERE job_id = $1", job_id)

    new_lease = await new.claim(job_id)

    assert new_lease is not None and new_lease.attempt == 2
    step = old_lease.steps[0]
    for write in (
        old.renew(old_lease),
        old.start_step(old_lease, step),
        old.progress(old_lease, step, "still here"),
        old.finish_step(old_lease, Finished(step, StepStatus.SUCCESS, "done")),
        old.finish_job(old_lease, JobStatus.SUCCESS),
    ):
        with pytest.raises(LeaseLost):
            await write
    row = await fetch_one(db, "SELECT status, lease_owner, attempt FROM ops_job WHERE job_id = $1", job_id)
    assert row == {"status": "running", "lease_owner": "worker-b", "attempt": 2}
    first_step = await fetch_one(
        db, "SELECT status, detail FROM ops_job_step WHERE job_id = $1 AND step_order = 1", job_id
    )
    assert first_step == {"status": "running", "detail": None}  # started again by the new claim


async def test_stopping_a_worker_releases_its_job_for_another_at_once(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    long_lease = settings.model_copy(update={"lease_ttl_s": 60})
    job_id = await submit(client, steps=2, sleep_s=1.5)

    async with running_worker(long_lease):
        # In the middle of its first step: the step has said that it sleeps.
        await wait_for(
            lambda: read_job(client, job_id),
            until=lambda job: job["steps"][0]["detail"] == "sleeping 1.5s",
            show=job_summary,
        )
    # The worker was cancelled mid-step (as on SIGTERM): the job is pending again, the step will run again.
    row = await fetch_one(db, "SELECT status, lease_owner FROM ops_job WHERE job_id = $1", job_id)
    assert row == {"status": "pending", "lease_owner": None}

    async with running_worker(long_lease):
        job = await wait_for_status(client, job_id, "success", "failed", within=6)

    assert job["status"] == "success" and job["attempt"] == 2
    assert [s["attempts"] for s in job["steps"]] == [2, 1]

    async def released() -> object:
        return await db.fetchval("SELECT count(*) FROM ops_job_event WHERE job_id = $1 AND kind = 'released'", job_id)

    assert await wait_for(released) == 1
