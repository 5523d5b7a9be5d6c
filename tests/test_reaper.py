"""The reaper delivers what PostgreSQL says must run but Redis does not hold."""

from __future__ import annotations

import asyncpg
import httpx
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from jobs.runtime.leases import Finished, Leases
from service.db import create_engine, create_sessions
from service.models import StepStatus
from service.queue import delivery_id
from service.settings import Settings
from tests.conftest import api_client, fetch_one, free_port, headers, running_worker, wait_for_status


async def test_job_accepted_while_redis_is_unreachable_runs_later(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    no_redis = settings.model_copy(
        update={"redis_url": Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0").redis_url}
    )
    async with api_client(no_redis, headers=headers("writer")) as cut_off:
        response = await cut_off.post("/ops/jobs/noop", json={"steps": 2})
    assert response.status_code == 202
    job_id = response.json()["job_id"]

    fast_reaper = settings.model_copy(update={"reaper_interval_s": 0.2, "requeue_pending_after_s": 0.1})
    async with running_worker(fast_reaper):
        job = await wait_for_status(client, job_id, "success", "failed", within=5)

    assert job["status"] == "success" and job["attempt"] == 1
    redelivered = await fetch_one(
        db, "SELECT detail, actor FROM ops_job_event WHERE job_id = $1 AND kind = 'redelivered'", job_id
    )
    assert redelivered["detail"] == "pending and not in the queue" and redelivered["actor"].startswith("reaper:")


async def test_job_of_a_dead_worker_resumes_at_its_interrupted_step(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection, redis: Redis
) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 3})).json()["job_id"]
    # A worker claims the job (which starts step 1), finishes step 1, starts step 2 and dies (no release, nothing
    # more written).
    engine = create_engine(settings, "dead-worker")
    try:
        dead = Leases(create_sessions(engine), "dead-worker", ttl_s=1)
        lease = await dead.claim(job_id)
        assert lease is not None
        assert lease.started_step == 1
        first, second, _ = lease.steps
        await dead.start_step(lease, second, after=Finished(first, StepStatus.SUCCESS, "done before the crash"))
    finally:
        await engine.dispose()
    # The dead worker had taken the delivery off the queue; only the reaper can bring the job back.
    await redis.delete(settings.queue_name)
    await db.execute("UPDATE ops_job SET lease_expires_at = now() - interval '1 second' WHERE job_id = $1", job_id)

    fast_reaper = settings.model_copy(update={"reaper_interval_s": 0.2})
    async with running_worker(fast_reaper):
        job = await wait_for_status(client, job_id, "success", "failed", within=5)

    assert job["status"] == "success" and job["attempt"] == 2
    assert [(s["status"], s["attempts"]) for s in job["steps"]] == [("success", 1), ("success", 2), ("success", 1)]
    assert job["steps"][0]["detail"] == "done before the crash"
    claims = await fetch_one(
        db, "SELECT count(*) AS n FROM ops_job_event WHERE job_id = $1 AND kind = 'claimed'", job_id
    )
    assert claims == {"n": 2}
    kinds = [
        r["kind"] for r in await db.fetch("SELECT kind FROM ops_job_event WHERE job_id = $1 ORDER BY event_id", job_id)
    ]
    assert kinds.count("redelivered") == 1
    takeover = await fetch_one(
        db, "SELECT detail FROM ops_job_event WHERE job_id = $1 AND kind = 'claimed' AND attempt = 2", job_id
    )
    assert takeover["detail"].endswith("took over from dead-worker, whose lease expired")


async def test_job_state_remembered_on_one_worker_is_seen_where_the_job_resumes(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection, redis: Redis
) -> None:
    job_id = (await client.post("/ops/jobs/memo", json={})).json()["job_id"]
    engine = create_engine(settings, "dead-worker")
    try:
        dead = Leases(create_sessions(engine), "dead-worker", ttl_s=1)
        lease = await dead.claim(job_id)
        assert lease is not None and lease.state == {}
        learn, _ = lease.steps
        await dead.remember(lease, {"learned_by": "attempt 1"})
        await dead.finish_step(lease, Finished(learn, StepStatus.SUCCESS, "learned"))
    finally:
        await engine.dispose()
    await redis.delete(settings.queue_name)
    await db.execute("UPDATE ops_job SET lease_expires_at = now() - interval '1 second' WHERE job_id = $1", job_id)

    async with running_worker(settings.model_copy(update={"reaper_interval_s": 0.2})):
        job = await wait_for_status(client, job_id, "success", "failed", within=5)

    assert job["attempt"] == 2
    assert [s["detail"] for s in job["steps"]] == ["learned", "recalled what attempt 1 learned"]
    assert await db.fetchval("SELECT state FROM ops_job WHERE job_id = $1", job_id) == '{"learned_by": "attempt 1"}'


async def test_delivery_taken_by_a_worker_that_died_before_claiming_is_superseded(
    client: httpx.AsyncClient, settings: Settings, redis: Redis
) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 1})).json()["job_id"]
    # A worker took the delivery off the queue (arq's in-progress key) and was SIGKILLed before claiming the job:
    # arq keeps that delivery blocked for its whole job timeout.
    await redis.set(f"{in_progress_key_prefix}{delivery_id(job_id, 0)}", b"1", ex=3600)

    quick = settings.model_copy(
        update={"reaper_interval_s": 0.2, "requeue_pending_after_s": 0.1, "redeliver_after_s": 0.5}
    )
    async with running_worker(quick):
        job = await wait_for_status(client, job_id, "success", "failed", within=5)

    assert job["status"] == "success" and job["attempt"] == 1
