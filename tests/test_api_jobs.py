"""Submitting, reading and listing jobs over HTTP (the real ASGI app, real PostgreSQL and Redis)."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
from redis.asyncio import Redis

from service.settings import Settings
from tests.conftest import fetch_one, headers, read_job, run_burst


async def test_submit_writes_job_steps_and_event_then_enqueues(
    client: httpx.AsyncClient, db: asyncpg.Connection, redis: Redis, settings: Settings
) -> None:
    response = await client.post("/ops/jobs/noop", json={"steps": 3, "sleep_s": 0.5})

    assert response.status_code == 202
    body = response.json()
    job_id = body["job_id"]
    assert job_id.startswith("noop-") and len(job_id) == len("noop-") + 26
    assert response.headers["location"] == f"/ops/jobs/{job_id}"
    assert body["status"] == "pending" and body["actor"] == "writer" and body["source_ip"] == "10.1.2.3"
    assert body["params"] == {"steps": 3, "sleep_s": 0.5, "fail_at_step": None, "target": None}
    assert [s["name"] for s in body["steps"]] == ["step-1", "step-2", "step-3"]

    row = await fetch_one(db, "SELECT status, actor, source_ip FROM ops_job WHERE job_id = $1", job_id)
    assert row == {"status": "pending", "actor": "writer", "source_ip": "10.1.2.3"}
    steps = await db.fetch("SELECT name, status FROM ops_job_step WHERE job_id = $1 ORDER BY step_order", job_id)
    assert [(s["name"], s["status"]) for s in steps] == [
        ("step-1", "pending"),
        ("step-2", "pending"),
        ("step-3", "pending"),
    ]
    event = await fetch_one(db, "SELECT kind, actor, source_ip FROM ops_job_event WHERE job_id = $1", job_id)
    assert event == {"kind": "created", "actor": "writer", "source_ip": "10.1.2.3"}
    # arq's queue is a sorted set named after the queue; the one queued job carries our id.
    assert await redis.zcard(settings.queue_name) == 1


async def test_get_returns_the_job_with_ordered_steps(client: httpx.AsyncClient) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 12})).json()["job_id"]

    response = await client.get(f"/ops/jobs/{job_id}")

    assert response.status_code == 200
    job = response.json()
    assert job["job_id"] == job_id and job["type"] == "noop"
    assert [s["step_order"] for s in job["steps"]] == list(range(1, 13))
    assert set(job["steps"][0]) == {"name", "step_order", "status", "detail", "attempts", "started_at", "finished_at"}


async def test_empty_body_means_default_params(client: httpx.AsyncClient) -> None:
    response = await client.post("/ops/jobs/noop")

    assert response.status_code == 202
    assert len(response.json()["steps"]) == 2


async def test_list_is_newest_first_and_pages_with_a_cursor(client: httpx.AsyncClient) -> None:
    ids = []
    for _ in range(5):
        ids.append((await client.post("/ops/jobs/noop", json={"steps": 1})).json()["job_id"])
        await asyncio.sleep(0.002)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/ops/jobs", params=params)).json()
        seen += [job["job_id"] for job in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == list(reversed(ids))
    assert pages == 3


async def test_a_job_reads_the_same_in_its_submit_response_its_get_and_a_list(client: httpx.AsyncClient) -> None:
    submitted = [(await client.post("/ops/jobs/noop", json={"steps": n})).json() for n in (12, 3)]

    listed = (await client.get("/ops/jobs")).json()["jobs"]
    read = [(await client.get(f"/ops/jobs/{job['job_id']}")).json() for job in submitted]

    assert listed == list(reversed(submitted)) == list(reversed(read))
    assert [s["step_order"] for s in listed[1]["steps"]] == list(range(1, 13))


async def test_a_job_that_ran_reads_the_same_in_its_get_and_a_list(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 2})).json()["job_id"]
    await run_burst(settings)
    job = await read_job(client, job_id)
    assert job["status"] == "success", job

    listed = (await client.get("/ops/jobs")).json()["jobs"]

    assert listed == [job]
    assert all(step["started_at"].endswith("Z") and step["finished_at"].endswith("Z") for step in job["steps"])


async def test_list_filters_by_type_status_actor_and_target(client: httpx.AsyncClient) -> None:
    mine = (await client.post("/ops/jobs/noop", json={"target": "db/a"})).json()["job_id"]
    admin_job = (await client.post("/ops/jobs/noop", json={}, headers=headers("admin"))).json()["job_id"]
    flaky = (await client.post("/ops/jobs/flaky", json={})).json()["job_id"]

    async def ids(**params: str) -> list[str]:
        response = await client.get("/ops/jobs", params=params)
        assert response.status_code == 200, response.text
        return [job["job_id"] for job in response.json()["jobs"]]

    assert await ids(type="flaky") == [flaky]
    assert await ids(actor="admin") == [admin_job]
    assert await ids(target="noop/db/a") == [mine]  # a noop names its target inside its own namespace
    assert set(await ids(status="pending")) == {mine, admin_job, flaky}
    assert await ids(status="success") == []
    assert await ids(type="noop", actor="writer") == [mine]


async def test_list_rejects_unknown_filters_and_bad_values(client: httpx.AsyncClient) -> None:
    for params, field in [
        ({"status": "done"}, "status"),
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"colour": "red"}, "colour"),
        ({"cursor": "not-a-cursor"}, "cursor"),
    ]:
        response = await client.get("/ops/jobs", params=params)
        assert response.status_code == 422, params
        error = response.json()["error"]
        assert error["code"] == "invalid_params"
        assert [d["field"] for d in error["details"]] == [field], params


async def test_a_job_shows_what_its_steps_recorded_and_who_runs_it(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    created = (await client.post("/ops/jobs/memo", json={})).json()
    assert created["state"] == {} and created["lease_owner"] is None

    await run_burst(settings)

    job = await read_job(client, created["job_id"])
    assert job["status"] == "success", job
    assert job["state"] == {"learned_by": "attempt 1"}
    assert job["steps"][1]["detail"] == "recalled what attempt 1 learned"


async def test_job_types_lists_params_schema_and_steps(client: httpx.AsyncClient) -> None:
    response = await client.get("/ops/job-types")

    assert response.status_code == 200
    types = {t["name"]: t for t in response.json()["job_types"]}
    noop = types["noop"]
    assert noop["params_schema"]["properties"]["steps"]["maximum"] == 20
    assert noop["params_schema"]["properties"]["sleep_s"]["maximum"] == 600
    assert noop["steps"][:3] == ["step-1", "step-2", "step-3"]
    assert types["slow"]["steps"] == ["wait-for-thing"]


async def test_second_active_job_for_a_target_is_a_conflict_naming_the_first(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    first = (await client.post("/ops/jobs/noop", json={"target": "k8s/ctx/db/pg"})).json()["job_id"]

    response = await client.post("/ops/jobs/noop", json={"target": "k8s/ctx/db/pg"})

    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "conflict" and error["details"]["blocking_job_id"] == first
    assert first in error["message"]
    assert await db.fetchval("SELECT count(*) FROM ops_job") == 1
