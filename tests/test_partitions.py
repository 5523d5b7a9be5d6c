"""One runner, always: a worker cut off from PostgreSQL stops its step before another worker may take the job over.

Worker A reaches PostgreSQL through a proxy (tests/proxy.py), worker B directly; both are real worker processes.
A runs a recording step (tests.testjobs.RECORDER: a tick per 100 ms to a file, which the cut does not touch) when the
proxy fails the way networks fail. From the ticks and the job's history: no instant at which two attempts ran, B
took over within 15 s of the cut, and nothing A sent late changed the job.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from service.jobtypes import Registry
from service.settings import Settings
from tests.conftest import api_client, free_port, headers, submit, wait_for, wait_for_status
from tests.history import assert_no_step_ran_on_two_workers_at_once, assert_no_two_attempts_ran_at_once, tick_spans
from tests.processes import job_worker
from tests.proxy import Cut, TcpProxy
from tests.testjobs import RECORDER

# A lease of 5 s (its margin a fifth of it), and reapers that look for expired leases 4 times a second.
LEASE = {"lease_ttl_s": 5.0, "reaper_interval_s": 0.25}
RECORD_S = 4.0


def _through(settings: Settings, proxy: TcpProxy) -> Settings:
    url = make_url(settings.database_url.get_secret_value()).set(port=proxy.port).render_as_string(False)
    return settings.model_copy(update={"database_url": Settings(database_url=url).database_url})


async def _workers(client: httpx.AsyncClient) -> list[dict[str, object]]:
    workers: list[dict[str, object]] = (await client.get("/ops/workers")).json()["workers"]
    return workers


def _ticks(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cut", [Cut.REFUSE, Cut.BLACKHOLE, Cut.TRICKLE], ids=lambda cut: cut.value)
async def test_a_worker_cut_off_from_postgres_stops_its_step_before_another_takes_the_job_over(
    cut: Cut, settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    fast = settings.model_copy(update=LEASE)
    registry = Registry([RECORDER])
    postgres_port = make_url(settings.database_url.get_secret_value()).port or 5432
    proxy = TcpProxy(free_port(), "127.0.0.1", postgres_port)
    await proxy.start()
    ticks = tmp_path / "ticks"
    try:
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(api_client(fast, registry, headers=headers("writer")))
            job_id = await submit(client, "recorder", path=str(ticks), seconds=RECORD_S)
            await stack.enter_async_context(job_worker(tmp_path, "a", _through(fast, proxy), registry))
            await wait_for(lambda: _async(_ticks(ticks)), within=20, until=lambda n: n >= 5)
            await stack.enter_async_context(job_worker(tmp_path, "b", fast, registry))
            await wait_for(lambda: _workers(client), within=20, until=lambda found: len(found) == 2)

            await proxy.turn(cut)
            cut_at = time.monotonic()
            # A says that it cannot reach PostgreSQL, in its heartbeat (GET /ops/workers), and so takes no jobs.
            unreachable = await wait_for(
                lambda: _workers(client), within=15, until=lambda found: any(not w["accepting_jobs"] for w in found)
            )
            job = await wait_for_status(client, job_id, "success", "failed", within=40)
    finally:
        await proxy.close()

    spans = tick_spans(ticks)
    stopped_after = spans[1][1] - cut_at
    taken_over_after = spans[2][0] - cut_at
    print(
        f"{cut.value}: A's step stopped {stopped_after:.2f}s after the cut; B's started {taken_over_after:.2f}s after"
    )
    assert job["status"] == "success", job
    assert job["attempt"] == 2 and job["steps"][0]["attempts"] == 2, job
    assert_no_two_attempts_ran_at_once(spans)
    assert stopped_after < LEASE["lease_ttl_s"], "A stopped its step within its lease"
    assert taken_over_after < 15, "B took the job over within 15 s of the cut"
    # Nothing A sent changed the job after B had claimed it: A's late writes (a trickle delivers them) were refused.
    await assert_no_step_ran_on_two_workers_at_once(db, [job_id], steps=["record"])
    assert [w["database"] for w in unreachable if not w["accepting_jobs"]] == ["unreachable"]
    log = (tmp_path / "a.log").read_text(encoding="utf-8")
    assert "PostgreSQL unreachable" in log, log
    assert "the running step was cancelled before the lease could expire" in log or "stops acting" in log, log


async def _async(value: int) -> int:
    return value
