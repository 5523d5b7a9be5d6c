"""The measurements, each run the same way against the service (over HTTP) and the floor (asyncpg + arq).

Results are read back from PostgreSQL where the database knows best: a job's pickup is its `created_at` to its
first step's `started_at`, and a batch is done when its last row says `success`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg

from service.api.listing import encode_cursor
from tests.bench.floor import FloorClient
from tests.bench.load import HttpClient, Run, closed_loop, open_loop, percentile
from tests.bench.stack import FLOOR_SCHEMA

CONCURRENCY = 32
POLL_S = 0.05
# A batch that has not finished by then is reported as an error, not waited for forever.
MIN_BATCH_TIMEOUT_S = 60.0
SLOWEST_EXPECTED_JOBS_PER_S = 5.0


class Side(Protocol):
    """One of the two things measured: the service, or the floor."""

    name: str
    schema: str

    async def submit(self) -> str: ...

    async def read(self, job_id: str) -> None: ...

    async def list_page(self, status: str | None, cursor: tuple[datetime, str] | None) -> int: ...


class ServiceSide:
    name = "service"
    schema = "public"
    BODY = json.dumps({"steps": 2}).encode()

    def __init__(self, http: HttpClient) -> None:
        self.http = http

    async def submit(self) -> str:
        status, body = await self.http.request("POST", "/ops/jobs/noop", self.BODY)
        if status != 202:
            raise RuntimeError(f"POST /ops/jobs/noop: {status} {body[:200]!r}")
        job_id: str = json.loads(body)["job_id"]
        return job_id

    async def read(self, job_id: str) -> None:
        status, body = await self.http.request("GET", f"/ops/jobs/{job_id}")
        if status != 200:
            raise RuntimeError(f"GET /ops/jobs/{job_id}: {status} {body[:200]!r}")

    async def list_page(self, status: str | None, cursor: tuple[datetime, str] | None) -> int:
        query = ["limit=50"]
        if status is not None:
            query.append(f"status={status}")
        if cursor is not None:
            # The service's own cursor format, built by its own function.
            query.append(f"cursor={encode_cursor(*cursor)}")
        code, body = await self.http.request("GET", f"/ops/jobs?{'&'.join(query)}")
        if code != 200:
            raise RuntimeError(f"GET /ops/jobs: {code} {body[:200]!r}")
        return len(json.loads(body)["jobs"])


class FloorSide:
    name = "floor"
    schema = FLOOR_SCHEMA

    def __init__(self, client: FloorClient) -> None:
        self.client = client

    async def submit(self) -> str:
        return await self.client.submit()

    async def read(self, job_id: str) -> None:
        await self.client.read(job_id)

    async def list_page(self, status: str | None, cursor: tuple[datetime, str] | None) -> int:
        return await self.client.list_page(status, cursor)


def _stats(run: Run[Any]) -> dict[str, Any]:
    return {
        "count": len(run.results),
        "errors": len(run.errors),
        "first_error": run.errors[0] if run.errors else None,
        "elapsed_s": round(run.elapsed, 3),
        "rate_per_s": round(run.rate, 1),
        "p50_ms": round(run.p(50) * 1000, 2),
        "p99_ms": round(run.p(99) * 1000, 2),
    }


async def submit_only(side: Side, db: asyncpg.Connection, count: int) -> dict[str, Any]:
    """Submissions at concurrency 32 with no worker running; the jobs are then cancelled, so no later phase
    runs them (the caller empties the queue)."""
    run = await closed_loop(count, CONCURRENCY, side.submit)
    await db.execute(
        f"UPDATE {side.schema}.ops_job SET status = 'cancelled', finished_at = now() WHERE status = 'pending'"
    )
    return _stats(run)


async def _wait_batch(db: asyncpg.Connection, schema: str, since: datetime, count: int) -> datetime:
    """Until `count` jobs created since `since` have succeeded; returns when the last one finished."""
    deadline = time.monotonic() + max(MIN_BATCH_TIMEOUT_S, count / SLOWEST_EXPECTED_JOBS_PER_S)
    while True:
        row = await db.fetchrow(
            f"""SELECT count(*) FILTER (WHERE status = 'success') AS done,
                       count(*) FILTER (WHERE status IN ('failed', 'cancelled')) AS bad, max(finished_at) AS last
                FROM {schema}.ops_job WHERE created_at >= $1""",
            since,
        )
        assert row is not None
        if row["bad"]:
            raise RuntimeError(f"{row['bad']} job(s) of the batch failed or were cancelled")
        if row["done"] >= count:
            last: datetime = row["last"]
            return last
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {row['done']} of {count} jobs succeeded in time")
        await asyncio.sleep(POLL_S)


async def _pickups_ms(db: asyncpg.Connection, schema: str, since: datetime) -> list[float]:
    rows = await db.fetch(
        f"""SELECT extract(epoch FROM s.started_at - j.created_at) * 1000 AS ms
            FROM {schema}.ops_job j JOIN {schema}.ops_job_step s ON s.job_id = j.job_id AND s.step_order = 1
            WHERE j.created_at >= $1""",
        since,
    )
    return [float(row["ms"]) for row in rows]


def _pickup_stats(pickups: list[float]) -> dict[str, Any]:
    ordered = sorted(pickups)
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 50), 2),
        "p99_ms": round(percentile(ordered, 99), 2),
        "max_ms": round(ordered[-1], 2) if ordered else None,
    }


def _now() -> datetime:
    return datetime.now(UTC)


async def batch(side: Side, db: asyncpg.Connection, count: int) -> dict[str, Any]:
    """End-to-end: `count` jobs submitted at concurrency 32 while the workers run them; throughput is jobs over
    the time from the first submission to the last job's success."""
    since = _now()
    run = await closed_loop(count, CONCURRENCY, side.submit)
    if run.errors:
        raise RuntimeError(f"{len(run.errors)} submissions failed, first: {run.errors[0]}")
    last = await _wait_batch(db, side.schema, since, count)
    elapsed = (last - since).total_seconds()
    pickups = await _pickups_ms(db, side.schema, since)
    return {
        "count": count,
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(count / elapsed, 1),
        "submit": _stats(run),
        "pickup": _pickup_stats(pickups),
    }


async def idle_pickups(side: Side, db: asyncpg.Connection, count: int) -> dict[str, Any]:
    """One job at a time, each submitted 100-200 ms after the last one ended (a random gap, so that submissions
    land anywhere in the workers' poll cycle)."""
    since = _now()
    for _ in range(count):
        job_id = await side.submit()
        deadline = time.monotonic() + 10
        while await db.fetchval(f"SELECT status FROM {side.schema}.ops_job WHERE job_id = $1", job_id) != "success":
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} did not succeed within 10 s")
            await asyncio.sleep(0.01)
        await asyncio.sleep(random.uniform(0.1, 0.2))
    return _pickup_stats(await _pickups_ms(db, side.schema, since))


async def loaded_pickups(side: Side, db: asyncpg.Connection, rate: float, duration_s: float) -> dict[str, Any]:
    """Jobs submitted at a steady `rate` (open loop) while the workers run them."""
    since = _now()
    run = await open_loop(rate, duration_s, side.submit)
    if run.errors:
        raise RuntimeError(f"{len(run.errors)} submissions failed, first: {run.errors[0]}")
    await _wait_batch(db, side.schema, since, len(run.results))
    return {
        "rate_per_s": round(rate, 1),
        "submit": _stats(run),
        **_pickup_stats(await _pickups_ms(db, side.schema, since)),
    }


async def reads(side: Side, job_ids: list[str], rate: float, duration_s: float) -> dict[str, Any]:
    """`GET /ops/jobs/{id}` (or the floor's two queries) of random existing jobs at a steady rate."""
    return _stats(await open_loop(rate, duration_s, lambda: side.read(random.choice(job_ids))))


@dataclass(frozen=True)
class ListCase:
    name: str
    status: str | None
    cursor: tuple[datetime, str] | None


async def list_pages(side: Side, case: ListCase, repeats: int) -> dict[str, Any]:
    """The same page, one request at a time."""

    async def page() -> int:
        size = await side.list_page(case.status, case.cursor)
        if size != 50:
            raise RuntimeError(f"{case.name}: a page of {size} jobs, expected 50")
        return size

    await closed_loop(5, 1, page)  # warm the plan caches and the pages' buffers
    return _stats(await closed_loop(repeats, 1, page))


@dataclass(frozen=True)
class ConsoleCase:
    name: str
    query: str


def console_cases(deep: tuple[datetime, str]) -> list[ConsoleCase]:
    """The jobs page as an on-call engineer opens it: all, failed only, several filters at once, and an old page."""
    day_ago = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    return [
        ConsoleCase("newest", ""),
        ConsoleCase("status=failed", "status=failed"),
        ConsoleCase("failed or cancelled pg-rebuild, last 24 h",
                    f"status=failed&status=cancelled&type=pg-rebuild&since={day_ago}"),
        ConsoleCase("deep page", f"cursor={encode_cursor(*deep)}"),
    ]  # fmt: skip


async def console_pages(http: HttpClient, case: ConsoleCase, repeats: int) -> dict[str, Any]:
    """The console's jobs page (`/ui/`, HTML with its counts by status), one request at a time."""

    async def page() -> int:
        status, body = await http.request("GET", f"/ui/?{case.query}")
        if status != 200 or body.count(b'<tr id="job-') != 50:
            raise RuntimeError(f"/ui/?{case.query}: {status}, {body.count(b'<tr id=')} rows, {body[:200]!r}")
        return len(body)

    await closed_loop(5, 1, page)
    return _stats(await closed_loop(repeats, 1, page))
