"""Nothing lost, nothing run twice, with real worker processes and real signals."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from jobs.noop import JOB as NOOP
from service.jobtypes import Registry
from service.settings import Settings
from tests.conftest import api_client, free_port, headers, job_summary, read_job, submit, wait_for
from tests.history import assert_no_step_ran_on_two_workers_at_once, assert_no_two_attempts_ran_at_once, tick_spans
from tests.processes import RedisServer, start_job_worker, stop, workers
from tests.proxy import Cut, TcpProxy
from tests.testjobs import RECORDER


async def _until(client: httpx.AsyncClient, job_id: str, check: Any, within: float) -> Any:
    return await wait_for(lambda: read_job(client, job_id), within, until=check, show=job_summary)


async def _pids_by_worker(client: httpx.AsyncClient) -> dict[str, int]:
    """The live workers' ids and process ids, from GET /ops/workers: each worker's heartbeat, written as it starts."""
    return {w["worker"]: w["pid"] for w in (await client.get("/ops/workers")).json()["workers"]}


async def test_job_of_a_sigkilled_worker_runs_again_on_another_within_15s(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 3, "sleep_s": 1.5})).json()["job_id"]

    # Both workers run with the default lease TTL and reaper interval.
    async with workers(settings, 1) as (doomed,):
        await _until(client, job_id, lambda j: j["steps"][1]["status"] == "running", within=15)
        doomed.kill()
        killed_at = time.monotonic()
        await doomed.wait()
    async with workers(settings, 1):
        await _until(client, job_id, lambda j: j["attempt"] == 2 and j["status"] == "running", within=20)
        resumed_after = time.monotonic() - killed_at
        job = await _until(client, job_id, lambda j: j["status"] in ("success", "failed"), within=15)

    assert resumed_after < 15, f"resumed {resumed_after:.1f}s after the SIGKILL"
    assert job["status"] == "success"
    assert [s["attempts"] for s in job["steps"]] == [1, 2, 1], "only the interrupted step ran again"


async def test_sigterm_hands_running_jobs_to_another_worker_at_once(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    async with workers(settings, 2) as pool:
        pids = await wait_for(lambda: _pids_by_worker(client), within=30, until=lambda found: len(found) == 2)
        job_id = (await client.post("/ops/jobs/noop", json={"steps": 3, "sleep_s": 1})).json()["job_id"]
        await _until(client, job_id, lambda j: j["steps"][0]["status"] == "running", within=15)
        owner = await db.fetchval("SELECT lease_owner FROM ops_job WHERE job_id = $1", job_id)
        first = next(process for process in pool if process.pid == pids[owner])

        stopped_at = time.monotonic()
        assert await stop(first, signal.SIGTERM) == 0
        exited_after = time.monotonic() - stopped_at
        job = await _until(client, job_id, lambda j: j["attempt"] == 2, within=5)
        resumed_after = time.monotonic() - stopped_at
        job = await _until(client, job_id, lambda j: j["status"] in ("success", "failed"), within=15)

    assert exited_after < 2, "the worker finished its running step and left"
    assert resumed_after < 3, f"resumed {resumed_after:.1f}s after SIGTERM"
    assert job["status"] == "success"
    assert [s["attempts"] for s in job["steps"]] == [1, 1, 1], "no step ran twice"
    released = await db.fetchval("SELECT count(*) FROM ops_job_event WHERE job_id = $1 AND kind = 'released'", job_id)
    assert released == 1


async def test_jobs_accepted_while_redis_is_down_all_run_once_it_is_back(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    redis = RedisServer(free_port(), tmp_path)
    await redis.start()
    own_redis = settings.model_copy(update={"redis_url": Settings(redis_url=redis.url).redis_url})
    try:
        async with api_client(own_redis, headers=headers("writer")) as client, workers(own_redis, 1) as (worker,):
            before = (await client.post("/ops/jobs/noop", json={"steps": 1})).json()["job_id"]
            await _until(client, before, lambda j: j["status"] == "success", within=15)

            await redis.stop()
            accepted = []
            for _ in range(5):
                response = await client.post("/ops/jobs/noop", json={"steps": 2})
                assert response.status_code == 202, response.text
                accepted.append(response.json()["job_id"])
            await asyncio.sleep(1)  # the outage, through which the worker's polls fail
            await redis.start()

            for job_id in accepted:
                job = await _until(client, job_id, lambda j: j["status"] in ("success", "failed"), within=20)
                assert job["status"] == "success" and job["attempt"] == 1
            assert worker.returncode is None, "the worker rode out the outage"
    finally:
        await redis.stop()


@pytest.mark.timeout(180)  # its own deadline is 120 s; about 30 s on an idle machine
async def test_soak_200_jobs_with_a_worker_killed_or_cut_off_every_few_seconds(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Two workers; every few seconds one is SIGKILLed (and started again), or worker 0, which reaches PostgreSQL
    through a proxy, is cut off from it (blackholed) for longer than its lease. A tenth of the jobs record every
    moment their step runs (tests.testjobs.RECORDER): no two attempts of one ever ran at once."""
    fast = settings.model_copy(
        update={"lease_ttl_s": 2, "reaper_interval_s": 0.5, "requeue_pending_after_s": 1, "worker_max_jobs": 10}
    )
    registry = Registry([NOOP, RECORDER])
    proxy = TcpProxy(free_port(), "127.0.0.1", make_url(settings.database_url.get_secret_value()).port or 5432)
    await proxy.start()
    url = make_url(settings.database_url.get_secret_value()).set(port=proxy.port).render_as_string(False)
    through_proxy = fast.model_copy(update={"database_url": Settings(database_url=url).database_url})
    noops: list[str] = []
    recorders: dict[str, Path] = {}
    kills = cuts = 0

    async def unfinished() -> int:
        return int(await db.fetchval("SELECT count(*) FROM ops_job WHERE status IN ('pending', 'running')"))

    async with api_client(fast, registry, headers=headers("writer")) as client:
        for n in range(200):
            if n % 10 == 0:
                ticks = tmp_path / f"ticks-{n}"
                recorders[await submit(client, "recorder", path=str(ticks), seconds=random.uniform(0.5, 1.5))] = ticks
            else:
                noops.append(await submit(client, "noop", steps=3, sleep_s=round(random.uniform(0.1, 0.4), 2)))
        configs = [through_proxy, fast]
        pool = [await start_job_worker(tmp_path, f"worker-{n}", configs[n], registry) for n in range(2)]
        try:
            deadline = time.monotonic() + 120
            # Until every job is done, and at least three kills and a cut have happened (on a fast machine the jobs
            # may all be done before that).
            while (await unfinished() or kills < 3 or cuts < 1) and time.monotonic() < deadline:
                await asyncio.sleep(random.uniform(1, 2))
                if (kills + cuts) % 3 == 2:
                    await proxy.turn(Cut.BLACKHOLE)
                    await asyncio.sleep(2.5)  # past the lease: worker 0's jobs are taken over
                    await proxy.restore()
                    cuts += 1
                    continue
                victim = random.randrange(len(pool))
                pool[victim].kill()
                await pool[victim].wait()
                kills += 1
                pool[victim] = await start_job_worker(tmp_path, f"worker-{victim}", configs[victim], registry)
        finally:
            for process in pool:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await proxy.close()

    statuses = await db.fetch("SELECT status, count(*) AS n FROM ops_job GROUP BY status")
    assert {r["status"]: r["n"] for r in statuses} == {"success": 200}
    assert kills >= 3 and cuts >= 1
    await assert_no_step_ran_on_two_workers_at_once(db, noops, steps=3)
    await assert_no_step_ran_on_two_workers_at_once(db, list(recorders), steps=["record"], expect_takeover=False)
    for ticks in recorders.values():
        assert_no_two_attempts_ran_at_once(tick_spans(ticks))


async def test_jobs_end_correctly_when_postgres_drops_out_while_they_run(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    proxy = TcpProxy(free_port(), "127.0.0.1", make_url(settings.database_url.get_secret_value()).port or 5432)
    await proxy.start()
    url = make_url(settings.database_url.get_secret_value()).set(port=proxy.port).render_as_string(False)
    through_proxy = settings.model_copy(update={"database_url": Settings(database_url=url).database_url})
    job_ids = [
        (await client.post("/ops/jobs/noop", json={"steps": 4, "sleep_s": 0.5})).json()["job_id"] for _ in range(5)
    ]
    try:
        # The outage outlasts the lease: the worker gives the jobs up, and its reaper resumes them afterwards.
        async with workers(through_proxy, 1, lease_ttl_s=2, reaper_interval_s=0.5) as (worker,):

            async def all_running() -> bool:
                return bool(await db.fetchval("SELECT bool_and(status = 'running') FROM ops_job"))

            await wait_for(all_running, within=15)
            await proxy.cut()
            await asyncio.sleep(4)  # the outage: twice the lease TTL
            await proxy.restore()

            async def all_finished() -> bool:
                return not await db.fetchval("SELECT count(*) FROM ops_job WHERE status IN ('pending', 'running')")

            await wait_for(all_finished, within=40)
            assert worker.returncode is None, "the worker rode out the outage"
    finally:
        await proxy.cut()

    for job_id in job_ids:
        job = await read_job(client, job_id)
        assert job["status"] == "success", job
        assert [s["status"] for s in job["steps"]] == ["success"] * 4
    await assert_no_step_ran_on_two_workers_at_once(db, job_ids, steps=4, expect_takeover=False)
