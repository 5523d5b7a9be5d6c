"""What the API must not give away: a redirect to wherever the Host header says, a 500 for a database that has merely
stalled, and statement parameters (params, idempotency keys) in its log."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from service.settings import Settings
from tests.conftest import api_client, free_port, headers, wait_for
from tests.proxy import Cut, TcpProxy


@pytest.mark.parametrize("path", ["/ops/jobs/", "/livez/", "/ops/jobs/some-id/"])
async def test_a_trailing_slash_is_a_404_never_a_redirect_to_the_host_header(settings: Settings, path: str) -> None:
    async with api_client(settings) as client:
        response = await client.get(path, headers={"Host": "evil.example"})
    assert response.status_code == 404
    assert "location" not in response.headers
    assert response.json()["error"]["code"] == "not_found"


async def test_a_stalled_database_is_503_like_a_down_one(settings: Settings) -> None:
    url = make_url(settings.database_url.get_secret_value())
    proxy = TcpProxy(free_port(), url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    stalling = settings.model_copy(
        update={
            "database_url": Settings(database_url=through_proxy).database_url,
            "db_pool_size": 1,
            "db_connect_timeout_s": 0.5,  # also how long a request waits for the pool's one connection
            "db_command_timeout_s": 2.0,
        }
    )
    try:
        async with api_client(stalling, headers=headers("reader")) as client:
            assert (await client.get("/ops/jobs")).status_code == 200
            await proxy.turn(Cut.BLACKHOLE)
            # One request holds the pool's connection, waiting for an answer; the other waits for the pool.
            responses = await asyncio.gather(client.get("/ops/jobs"), client.get("/ops/jobs"))
            await proxy.turn(Cut.PASS)
    finally:
        await proxy.turn(Cut.PASS)
        await proxy.cut()
    assert [r.status_code for r in responses] == [503, 503], [r.text for r in responses]
    assert {r.json()["error"]["code"] for r in responses} == {"dependency_unavailable"}


SECRET = "s3cr3t-t0ken-4f9a"


@pytest.mark.parametrize("failure", ["statement-error", "connection-lost"])
async def test_a_database_error_never_logs_the_statements_parameters(
    settings: Settings, db: asyncpg.Connection, capfd: pytest.CaptureFixture[str], failure: str
) -> None:
    # A real error from PostgreSQL in the insert of the job itself, whose parameters hold the secret: the statement
    # refused (a 500), or its connection terminated while it runs (a 503).
    action = "RAISE EXCEPTION 'refused by the test'" if failure == "statement-error" else "PERFORM pg_sleep(30)"
    await db.execute(f"""
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {action}; RETURN NEW; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON ops_job FOR EACH ROW EXECUTE FUNCTION refuse();
    """)
    async with api_client(settings, headers={**headers("writer"), "Idempotency-Key": f"key-{SECRET}"}) as client:
        submitting = asyncio.create_task(client.post("/ops/jobs/noop", json={"steps": 1, "target": f"db/{SECRET}"}))
        if failure == "connection-lost":

            async def terminated() -> bool:
                sleeping = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                return bool(await db.fetchval(sleeping))

            await wait_for(terminated)
        response = await submitting
    assert response.status_code == (500 if failure == "statement-error" else 503), response.text
    log = capfd.readouterr().err
    assert "INSERT INTO ops_job" in log and "parameters hidden" in log  # the error and its statement are logged...
    assert SECRET not in log  # ...but not what the statement carried
    assert SECRET not in response.text
