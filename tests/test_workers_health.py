"""Worker health: arq's own check, and the per-worker heartbeats behind GET /ops/workers."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.runtime import health
from service.settings import Settings
from tests.conftest import wait_for
from tests.processes import stop, worker_env, workers

ARQ = str(Path(sys.executable).with_name("arq"))


async def _arq_check(settings: Settings) -> int:
    process = await asyncio.create_subprocess_exec(
        ARQ, "--check", "jobs.worker.WorkerSettings", env=worker_env(settings), stdout=asyncio.subprocess.DEVNULL
    )
    return await process.wait()


async def test_workers_are_listed_with_their_jobs_while_alive_and_checkable(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    assert (await client.get("/ops/workers")).json() == {"workers": []}
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 1, "sleep_s": 5})).json()["job_id"]

    async with workers(settings, 1) as (worker,):

        async def listed_running_the_job() -> Any:
            found = (await client.get("/ops/workers")).json()["workers"]
            return found if found and found[0]["running"] == [job_id] else None

        found = await wait_for(listed_running_the_job, within=15)
        assert await _arq_check(settings) == 0
        assert found[0]["pid"] == worker.pid and found[0]["queue"] == settings.queue_name
        assert await stop(worker, signal.SIGINT) == 0

    assert (await client.get("/ops/workers")).json() == {"workers": []}
    assert await _arq_check(settings) != 0


async def test_a_worker_that_cannot_reach_postgres_says_so_at_once_then_every_few_seconds_until_it_can(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "PROBE_S", 0.01)
    monkeypatch.setattr(health, "SAY_EVERY_S", 0.05)
    changes: list[bool] = []
    database = health.DatabaseHealth(on_change=changes.append)
    answers = False

    async def probe() -> None:  # as a statement does: it reports how it went
        if answers:
            database.reached()
        else:
            database.failed(OSError("connection refused"))

    def said(words: str) -> int:
        return sum(words in r.getMessage() for r in caplog.records if r.name == "jobs.runtime.health")

    watching = asyncio.create_task(database.watch(probe))
    try:
        database.failed(OSError("connection refused"))
        assert said("PostgreSQL unreachable: connection refused; this worker takes no jobs") == 1
        assert database.status()["accepting_jobs"] is False
        await wait_for(lambda: _async(said("PostgreSQL still unreachable after")), until=lambda n: n >= 2)
        answers = True
        await wait_for(lambda: _async(database.reachable))
    finally:
        watching.cancel()
    assert said("PostgreSQL reachable again after") == 1
    assert changes == [False, True] and database.status() == {"database": "reachable", "accepting_jobs": True}


async def _async(value: object) -> object:
    return value
