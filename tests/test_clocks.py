"""Time comes from one clock: a delivery's score is Redis' time and lease expiries are PostgreSQL's, so a process
whose wall clock is wrong (an API two minutes ahead, workers two minutes behind or ahead) changes neither how fast a
job is picked up nor how fast a dead worker's job is taken over."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from arq.utils import timestamp_ms

import service.queue
from service.jobtypes import Registry
from service.settings import Settings
from tests.conftest import api_client, headers, read_job, submit, wait_for, wait_for_status
from tests.history import tick_spans
from tests.processes import job_worker
from tests.testjobs import RECORDER

SKEW_S = 120.0


async def _workers(client: httpx.AsyncClient) -> int:
    return len((await client.get("/ops/workers")).json()["workers"])


@pytest.mark.timeout(60)
async def test_pickup_and_takeover_are_the_same_whatever_the_processes_wall_clocks_say(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API (this process) runs two minutes ahead; one worker two minutes behind, the other two minutes ahead.
    monkeypatch.setattr(service.queue, "timestamp_ms", lambda: timestamp_ms() + int(SKEW_S * 1000))
    fast = settings.model_copy(update={"reaper_interval_s": 0.25})
    registry = Registry([RECORDER])
    ticks = tmp_path / "ticks"
    async with (
        api_client(fast, registry, headers=headers("writer")) as client,
        job_worker(tmp_path, "behind", fast, registry, clock_skew_s=-SKEW_S) as behind,
    ):
        await wait_for(lambda: _workers(client), within=20, until=lambda n: n == 1)
        submitted = time.monotonic()
        job_id = await submit(client, "recorder", path=str(ticks), seconds=1, first_attempt_s=60)
        await wait_for(lambda: read_job(client, job_id), within=10, until=lambda job: job["status"] == "running")
        picked_up_s = time.monotonic() - submitted

        async with job_worker(tmp_path, "ahead", fast, registry, clock_skew_s=SKEW_S):
            await wait_for(lambda: _workers(client), within=20, until=lambda n: n == 2)
            behind.kill()
            await behind.wait()
            killed_at = time.monotonic()
            job = await wait_for_status(client, job_id, "success", "failed", within=20)

    taken_over_s = tick_spans(ticks)[2][0] - killed_at
    print(f"picked up {picked_up_s:.2f}s after submission; taken over {taken_over_s:.2f}s after the kill")
    assert job["status"] == "success" and job["attempt"] == 2, job
    assert picked_up_s < 2, "pickup took the API's or the worker's clock skew into account"
    # As with true clocks: the lease (2 s) expires, a reaper (every 0.25 s) delivers, the other worker claims.
    assert taken_over_s < fast.lease_ttl_s + 3, "takeover took a wall clock skew into account"
