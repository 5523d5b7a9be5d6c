"""Probes: /livez needs nothing; /readyz names the dependency that is down, quickly, to a caller with a key, and
says only ready or not to anyone else."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from redis.asyncio import Redis

from service.db import PING_AFTER_IDLE_S
from service.settings import Settings
from tests.conftest import api_client, free_port, headers


async def test_livez_and_readyz_when_everything_is_up(settings: Settings) -> None:
    async with api_client(settings) as client:
        live = await client.get("/livez")
        ready = await client.get("/readyz", headers=headers("reader"))

    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "checks": {"postgres": "ok", "redis": "ok"}})


async def test_readyz_names_redis_when_it_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"redis_url": Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0").redis_url})
    async with api_client(down, headers=headers("reader")) as client:
        response = await client.get("/readyz")

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "dependency_unavailable"
    assert error["message"] == "not ready: redis unavailable"
    assert error["details"]["checks"]["postgres"] == "ok"
    assert error["details"]["checks"]["redis"].startswith("error: ")


async def test_readyz_names_postgres_when_it_is_down_within_its_timeout(settings: Settings) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/apiops"
    down = settings.model_copy(update={"database_url": Settings(database_url=url).database_url})
    async with api_client(down, headers=headers("reader")) as client:
        started = time.monotonic()
        response = await client.get("/readyz")
        elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert response.json()["error"]["message"] == "not ready: postgres unavailable"
    assert elapsed < settings.readiness_timeout_s + 0.5


@pytest.mark.parametrize("key", [None, "not-a-key"], ids=["no-key", "unknown-key"])
async def test_readyz_says_only_ready_or_not_without_a_valid_key(settings: Settings, key: str | None) -> None:
    redis_port = free_port()
    down = settings.model_copy(update={"redis_url": Settings(redis_url=f"redis://127.0.0.1:{redis_port}/0").redis_url})
    sent = {"X-API-Key": key} if key else {}
    async with api_client(settings, headers=sent) as client:
        ready = await client.get("/readyz")
    async with api_client(down, headers=sent) as client:
        not_ready = await client.get("/readyz")

    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert not_ready.status_code == 503
    assert not_ready.json() == {"error": {"code": "dependency_unavailable", "message": "not ready"}}
    assert str(redis_port) not in not_ready.text


async def test_submit_while_postgres_is_down_is_503_and_writes_nothing(
    settings: Settings, redis: Redis, db: asyncpg.Connection
) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/apiops"
    down = settings.model_copy(
        update={"database_url": Settings(database_url=url).database_url, "db_connect_timeout_s": 0.5}
    )
    async with api_client(down, headers=headers("writer")) as client:
        response = await client.post("/ops/jobs/noop", json={"steps": 2})

    assert response.status_code == 503
    assert response.json()["error"] == {
        "code": "dependency_unavailable",
        "message": "the database is unavailable; nothing was changed, try again shortly",
        "details": {"dependency": "postgres"},
    }
    assert await redis.zcard(settings.queue_name) == 0
    assert await db.fetchval("SELECT count(*) FROM ops_job") == 0


async def test_requests_after_postgres_dropped_the_idle_connections_succeed(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """As after a PostgreSQL restart: the pool's connections are dead, and no request may fail for it."""
    async with api_client(settings, headers=headers("writer")) as client:
        created = await asyncio.gather(*(client.post("/ops/jobs/noop", json={"steps": 1}) for _ in range(3)))
        dropped = await db.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'apiops-api'"
        )
        await asyncio.sleep(PING_AFTER_IDLE_S)
        after = await asyncio.gather(*(client.get(f"/ops/jobs/{r.json()['job_id']}") for r in created))
        submitted = await client.post("/ops/jobs/noop", json={"steps": 1})

    assert dropped >= 1
    assert [r.status_code for r in after] == [200, 200, 200]
    assert submitted.status_code == 202
