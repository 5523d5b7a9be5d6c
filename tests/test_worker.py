"""The worker, for real: an arq worker on a real Redis queue runs jobs submitted through the HTTP API."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest
from arq.worker import Worker

from service.queue import Delivery, enqueue
from service.settings import Settings
from tests import testjobs
from tests.conftest import read_job, run_burst, wait_for, wait_for_status


async def test_noop_job_runs_from_post_to_success(client: httpx.AsyncClient, settings: Settings) -> None:
    created = (await client.post("/ops/jobs/noop", json={"steps": 3})).json()

    await run_burst(settings)

    job = await read_job(client, created["job_id"])

    assert job["status"] == "success"
    assert job["attempt"] == 1
    assert job["started_at"] and job["finished_at"] and job["error"] is None
    assert [(s["name"], s["status"], s["attempts"]) for s in job["steps"]] == [
        ("step-1", "success", 1),
        ("step-2", "success", 1),
        ("step-3", "success", 1),
    ]
    for earlier, later in zip(job["steps"], job["steps"][1:], strict=False):
        assert earlier["finished_at"] <= later["started_at"], "steps ran out of order"


async def test_failing_step_fails_the_job_and_leaves_later_steps_pending(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    created = (await client.post("/ops/jobs/noop", json={"steps": 3, "fail_at_step": 2})).json()

    await run_burst(settings)

    job = await read_job(client, created["job_id"])

    assert job["status"] == "failed"
    assert job["error"] == "step step-2 failed: NoopFailure: failed on purpose at step 2"
    steps = {s["name"]: s for s in job["steps"]}
    assert steps["step-1"]["status"] == "success"
    assert steps["step-2"]["status"] == "failed"
    assert steps["step-2"]["detail"] == "error: NoopFailure: failed on purpose at step 2"
    assert steps["step-2"]["finished_at"] is not None
    assert steps["step-3"]["status"] == "pending" and steps["step-3"]["attempts"] == 0


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ("type = 'retired'", "UnknownJobType: unknown job type 'retired'"),
        ('params = \'{"steps": "many"}\'', "ValidationError: 1 validation error for NoopParams"),
    ],
)
async def test_a_job_this_worker_cannot_run_fails_at_once_saying_why(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection, change: str, error: str
) -> None:
    """A type the worker does not know (an older worker), or params that no longer validate (a changed model):
    failed with the reason, instead of delivered again every lease TTL."""
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 2})).json()["job_id"]
    await db.execute(f"UPDATE ops_job SET {change} WHERE job_id = $1", job_id)

    # In burst mode the worker would run a delivery put back for later too: it fails the job at once instead.
    await run_burst(settings, within=3)

    job = await read_job(client, job_id)
    assert job["status"] == "failed" and job["attempt"] == 1
    assert job["error"].startswith(f"this worker cannot run it: {error}")
    first, second = job["steps"]
    assert first["status"] == "failed" and first["detail"] == f"error: {job['error']}"
    assert second["status"] == "pending" and second["attempts"] == 0


async def test_progress_is_visible_while_a_step_runs(client: httpx.AsyncClient, worker: Worker) -> None:
    created = (await client.post("/ops/jobs/noop", json={"steps": 1, "sleep_s": 1})).json()

    running = await wait_for(
        lambda: read_job(client, created["job_id"]), until=lambda job: job["steps"][0]["detail"] is not None
    )

    assert running["status"] == "running"
    assert running["steps"][0]["status"] == "running"
    assert running["steps"][0]["detail"] == "sleeping 1s"
    assert running["steps"][0]["started_at"] is not None
    done = await wait_for_status(client, created["job_id"], "success")
    assert done["steps"][0]["detail"] == "slept 1s"


async def test_timed_out_step_says_what_it_was_waiting_for(client: httpx.AsyncClient, settings: Settings) -> None:
    created = (await client.post("/ops/jobs/slow", json={})).json()

    await run_burst(settings, within=3)

    job = await read_job(client, created["job_id"])

    step = job["steps"][0]
    assert step["status"] == "failed"
    assert step["detail"] == (
        "error: StepTimeout: no result within 0.3s; last seen: waiting for the thing; seen: nothing yet"
    )
    assert job["error"].startswith("step wait-for-thing failed: StepTimeout")


async def test_transient_errors_are_retried_within_the_step(client: httpx.AsyncClient, settings: Settings) -> None:
    created = (await client.post("/ops/jobs/flaky", json={"fail_times": 2})).json()

    await run_burst(settings, within=8)

    job = await read_job(client, created["job_id"])

    assert job["status"] == "success"
    assert job["steps"][0]["attempts"] == 3
    assert job["steps"][0]["detail"] == "worked on try 3"


async def test_transient_errors_beyond_the_attempt_limit_fail_the_step(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    created = (await client.post("/ops/jobs/flaky", json={"fail_times": 10})).json()

    await run_burst(settings, within=15)

    job = await read_job(client, created["job_id"])

    assert job["status"] == "failed"
    assert job["steps"][0]["attempts"] == 4
    assert job["steps"][0]["detail"] == "error: TransientError: upstream busy (try 4) (gave up after 4 tries)"


async def test_a_job_delivered_twice_runs_once(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection, redis: object
) -> None:
    created = (await client.post("/ops/jobs/noop", json={"steps": 2, "sleep_s": 0.3})).json()
    job_id = created["job_id"]
    from service.queue import create_redis

    arq_redis = create_redis(settings)
    try:
        # The API's own delivery again (round 0) is refused as a duplicate; three more rounds are new deliveries.
        outcomes = [
            await enqueue(arq_redis, job_id, 0, queue_name=settings.queue_name, timeout_s=2, round_=round_)
            for round_ in range(4)
        ]
        queued = await arq_redis.zcard(settings.queue_name)
    finally:
        await arq_redis.aclose(close_connection_pool=True)
    assert outcomes == [Delivery.ALREADY_QUEUED] + [Delivery.QUEUED] * 3
    assert queued == 4

    # Two workers, four deliveries of the same job id; in burst mode each returns once no delivery is left.
    await asyncio.gather(run_burst(settings, within=5), run_burst(settings, within=5))
    job = await read_job(client, job_id)

    assert job["status"] == "success"
    assert job["attempt"] == 1
    assert [s["attempts"] for s in job["steps"]] == [1, 1]
    claims = await db.fetchval("SELECT count(*) FROM ops_job_event WHERE job_id = $1 AND kind = 'claimed'", job_id)
    assert claims == 1


async def test_job_type_lifespan_opens_once_per_worker_and_steps_share_it(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    testjobs.LIFESPAN_LOG.clear()
    first = (await client.post("/ops/jobs/resourceful")).json()["job_id"]
    second = (await client.post("/ops/jobs/resourceful")).json()["job_id"]

    await run_burst(settings)

    jobs = [await read_job(client, job_id) for job_id in (first, second)]
    assert [job["status"] for job in jobs] == ["success", "success"]
    assert testjobs.LIFESPAN_LOG == ["opened", "closed"]
    for job in jobs:
        assert [s["detail"] for s in job["steps"]] == ["used the shared client"] * 2
