"""One runner, always: a worker cut off from PostgreSQL stops its step before another worker may take the job over.

Worker A reaches PostgreSQL (and, in some cases, Redis) through proxies (tests/proxy.py), worker B directly; both
are real worker processes. A runs a recording step (tests.testjobs.RECORDER: a tick per 100 ms to a file, which no
cut touches) when the proxies fail the way networks fail. From the ticks and the job's history: no instant at which
two attempts ran, B took over within 15 s of the cut, and nothing A sent late changed the job.
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

# A lease of 5 s (its margin a fifth of it), and reapers that look for expired leases 4 times a second; once, the
# default settings (a lease of 10 s, a reaper every 2 s), with which the takeover must come within 15 s of the cut.
FAST = {"lease_ttl_s": 5.0, "reaper_interval_s": 0.25}
DEFAULTS = {"lease_ttl_s": 10.0, "reaper_interval_s": 2.0}
RECORD_S = 4.0

CASES = [
    ("postgres", Cut.REFUSE, FAST),
    ("postgres", Cut.BLACKHOLE, FAST),
    ("postgres", Cut.TRICKLE, FAST),
    ("redis", Cut.BLACKHOLE, FAST),
    ("both", Cut.BLACKHOLE, FAST),
    ("postgres", Cut.BLACKHOLE, DEFAULTS),
]


def _proxied(url: str, proxy: TcpProxy) -> str:
    return make_url(url).set(port=proxy.port).render_as_string(False)


async def _proxy_to(url: str) -> TcpProxy:
    proxy = TcpProxy(free_port(), "127.0.0.1", make_url(url).port or 0)
    await proxy.start()
    return proxy


async def _workers(client: httpx.AsyncClient) -> list[dict[str, object]]:
    workers: list[dict[str, object]] = (await client.get("/ops/workers")).json()["workers"]
    return workers


async def _ticks(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0  # noqa: ASYNC240  # tiny


async def _metric(port: int, name: str) -> str | None:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    return next((line.split()[-1] for line in text.splitlines() if line.startswith(f"{name} ")), None)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("what", "cut", "lease"),
    CASES,
    ids=[f"{what}-{cut.value}" + ("-defaults" if lease is DEFAULTS else "") for what, cut, lease in CASES],
)
async def test_a_worker_cut_off_stops_its_step_before_another_takes_the_job_over(
    what: str, cut: Cut, lease: dict[str, float], settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    fast = settings.model_copy(update=lease)
    registry = Registry([RECORDER])
    database_url, redis_url = fast.database_url.get_secret_value(), fast.redis_url.get_secret_value()
    postgres, redis = await _proxy_to(database_url), await _proxy_to(redis_url)
    cut_off = {"postgres": [postgres], "redis": [redis], "both": [postgres, redis]}[what]
    metrics_port = free_port()
    a_settings = fast.model_copy(
        update={
            "database_url": Settings(database_url=_proxied(database_url, postgres)).database_url,
            "redis_url": Settings(redis_url=_proxied(redis_url, redis)).redis_url,
            "worker_metrics_port": metrics_port,
        }
    )
    ticks = tmp_path / "ticks"
    try:
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(api_client(fast, registry, headers=headers("writer")))
            # Attempt 1 outlasts the test unless it is stopped; cut off from Redis alone, A finishes it.
            first_s = 60 if postgres in cut_off else 8
            job_id = await submit(client, "recorder", path=str(ticks), seconds=RECORD_S, first_attempt_s=first_s)
            await stack.enter_async_context(job_worker(tmp_path, "a", a_settings, registry))
            await wait_for(lambda: _ticks(ticks), within=20, until=lambda n: n >= 5)
            await stack.enter_async_context(job_worker(tmp_path, "b", fast, registry))
            await wait_for(lambda: _workers(client), within=20, until=lambda found: len(found) == 2)

            for proxy in cut_off:
                await proxy.turn(cut)
            cut_at = time.monotonic()
            if postgres in cut_off:
                # A says that it cannot reach PostgreSQL, and so takes no jobs: in its /metrics, and in its heartbeat
                # (GET /ops/workers) while it reaches Redis.
                await wait_for(lambda: _metric(metrics_port, "apiops_worker_database_reachable"), until="0.0".__eq__)
            if what == "postgres":
                found = await wait_for(
                    lambda: _workers(client), until=lambda found: any(not w["accepting_jobs"] for w in found)
                )
                assert [w["database"] for w in found if not w["accepting_jobs"]] == ["unreachable"]
                # A takes no deliveries meanwhile: new jobs are picked up at once, by B.
                submitted = time.monotonic()
                others = [
                    await submit(client, "recorder", path=str(tmp_path / f"other-{n}"), seconds=0.2) for n in range(5)
                ]
                for other in others:
                    assert (await wait_for_status(client, other, "success", within=5))["attempt"] == 1
                assert time.monotonic() - submitted < 3, "new jobs waited on the worker cut off from PostgreSQL"
                a_log = (tmp_path / "a.log").read_text(encoding="utf-8")
                assert not [other for other in others if other in a_log], "A took a delivery"
            job = await wait_for_status(client, job_id, "success", "failed", within=40)
    finally:
        await postgres.close()
        await redis.close()

    assert job["status"] == "success", job
    spans = tick_spans(ticks)
    assert_no_two_attempts_ran_at_once(spans)
    if postgres not in cut_off:
        # The lease lives in PostgreSQL: A, cut off from Redis alone, goes on with the job; nobody takes it over.
        assert job["attempt"] == 1 and list(spans) == [1], job
        assert spans[1][1] > cut_at + 1, "the step went on after the cut"
        await assert_no_step_ran_on_two_workers_at_once(db, [job_id], steps=["record"], expect_takeover=False)
        return
    stopped_after, taken_over_after = spans[1][1] - cut_at, spans[2][0] - cut_at
    print(f"{what}-{cut.value}: A's step stopped {stopped_after:.2f}s after the cut, B's began {taken_over_after:.2f}s")
    assert job["attempt"] == 2 and job["steps"][0]["attempts"] == 2, job
    assert stopped_after < fast.lease_ttl_s - fast.lease_margin, "A stopped its step before the lease could expire"
    assert taken_over_after < 15, "B took the job over within 15 s of the cut"
    # Nothing A sent changed the job after B had claimed it: A's late writes (a trickle delivers them) were refused.
    await assert_no_step_ran_on_two_workers_at_once(db, [job_id], steps=["record"])
    log = (tmp_path / "a.log").read_text(encoding="utf-8")
    assert "PostgreSQL unreachable" in log, log
    assert "this worker stops acting on the job" in log or "cancelled before the lease could expire" in log, log
