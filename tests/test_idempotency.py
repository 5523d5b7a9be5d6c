"""Idempotency-Key replays, and one active job per target under racing submissions."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from tests.conftest import headers


async def test_same_key_and_body_returns_the_original_job(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    first = await client.post("/ops/jobs/noop", json={"steps": 3}, headers={"Idempotency-Key": "deploy-42"})
    again = await client.post("/ops/jobs/noop", json={"steps": 3}, headers={"Idempotency-Key": "deploy-42"})

    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["job_id"] == first.json()["job_id"]
    assert again.headers["location"] == first.headers["location"]
    assert await db.fetchval("SELECT count(*) FROM ops_job") == 1


async def test_same_key_with_another_body_is_a_409_conflict_naming_the_job(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    first = (await client.post("/ops/jobs/noop", json={"steps": 3}, headers={"Idempotency-Key": "k1"})).json()

    other_params = await client.post("/ops/jobs/noop", json={"steps": 4}, headers={"Idempotency-Key": "k1"})
    other_type = await client.post("/ops/jobs/flaky", json={}, headers={"Idempotency-Key": "k1"})

    for response in (other_params, other_type):
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "conflict" and first["job_id"] in error["message"]
        assert error["details"] == {"field": "Idempotency-Key", "job_id": first["job_id"]}
    assert await db.fetchval("SELECT count(*) FROM ops_job") == 1


async def test_keys_are_per_actor_and_expire_after_a_day(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    mine = (await client.post("/ops/jobs/noop", headers={"Idempotency-Key": "k"})).json()["job_id"]
    theirs = (await client.post("/ops/jobs/noop", headers={**headers("admin"), "Idempotency-Key": "k"})).json()
    assert theirs["job_id"] != mine

    await db.execute("UPDATE ops_job SET created_at = now() - interval '25 hours' WHERE job_id = $1", mine)
    fresh = await client.post("/ops/jobs/noop", headers={"Idempotency-Key": "k"})

    assert fresh.status_code == 202 and fresh.json()["job_id"] != mine


async def test_concurrent_requests_with_one_key_create_one_job(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    responses = await asyncio.gather(
        *(client.post("/ops/jobs/noop", json={"steps": 2}, headers={"Idempotency-Key": "race"}) for _ in range(8))
    )

    assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
    assert len({r.json()["job_id"] for r in responses}) == 1
    assert await db.fetchval("SELECT count(*) FROM ops_job") == 1


async def test_bad_idempotency_key_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/ops/jobs/noop", headers={"Idempotency-Key": "x" * 201})

    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "Idempotency-Key"


async def test_racing_submissions_for_one_target_let_exactly_one_through(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    responses = await asyncio.gather(
        *(client.post("/ops/jobs/noop", json={"target": "k8s/prod/db/pg"}) for _ in range(10))
    )

    accepted = [r for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code == 409]
    assert len(accepted) == 1 and len(refused) == 9
    winner = accepted[0].json()["job_id"]
    assert {r.json()["error"]["details"]["blocking_job_id"] for r in refused} == {winner}
    assert await db.fetchval("SELECT count(*) FROM ops_job") == 1
