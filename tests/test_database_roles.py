"""The least-privilege database roles of deploy/database-roles.sql, for real: on a database of the test's own, the
script (applied twice, with role names of the test's own) makes a migration role that migrates it without CREATEDB
and a runtime role that runs the API and a worker through a job, and is refused any DDL, DELETE or TRUNCATE."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from service.db import asyncpg_dsn
from service.settings import Settings
from tests.conftest import ADMIN_URL, REDIS_URL, free_port, headers, key_entries, migrate, wait_for, wait_for_status
from tests.processes import start_worker, stop, worker_env
from tests.test_db_upgrade import run_upgrade

SQL = Path(__file__).resolve().parents[1] / "deploy" / "database-roles.sql"
APIOPS = str(Path(sys.executable).with_name("apiops"))


@dataclass(frozen=True)
class Roles:
    database: str
    migrator: str
    runtime: str
    password: str

    def url(self, role: str) -> str:
        url = make_url(ADMIN_URL).set(drivername="postgresql+asyncpg", database=self.database)
        return url.set(username=role, password=self.password).render_as_string(hide_password=False)


async def _admin(database: str = "postgres") -> asyncpg.Connection:
    return await asyncpg.connect(asyncpg_dsn(ADMIN_URL, database), timeout=5)


async def _psql(roles: Roles) -> None:
    """The script as an operator runs it: psql as a superuser, connected to the service's database."""
    variables = {
        "migration_role": roles.migrator,
        "runtime_role": roles.runtime,
        "migration_password": roles.password,
        "runtime_password": roles.password,
    }
    dsn = make_url(asyncpg_dsn(ADMIN_URL, roles.database)).render_as_string(hide_password=False)
    process = await asyncio.create_subprocess_exec(
        "psql", dsn, "-X", "-q", *(f"--variable={k}={v}" for k, v in variables.items()), "-f", str(SQL),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()


@asynccontextmanager
async def _roles() -> AsyncIterator[Roles]:
    """A fresh database (owned by the administrator, as an operator would make it) and two role names, all
    dropped at the end."""
    suffix = secrets.token_hex(4)
    roles = Roles(f"apiops_test_roles_{suffix}", f"apiops_test_mig_{suffix}", f"apiops_test_rt_{suffix}", suffix)
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{roles.database}"')
        yield roles
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{roles.database}" WITH (FORCE)')
        for role in (roles.migrator, roles.runtime):
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


@asynccontextmanager
async def _connect(roles: Roles, role: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(roles.url(role)), timeout=5)
    try:
        yield conn
    finally:
        await conn.close()


async def _refused(conn: asyncpg.Connection, statement: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute(statement)


@asynccontextmanager
async def _service(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """`apiops serve` and `arq jobs.worker.WorkerSettings` as processes with `settings`; a client of the API."""
    port = free_port()
    env = worker_env(settings) | {
        "APIOPS_API_KEYS": "[" + ",".join(k.model_dump_json() for k in key_entries()) + "]",
        "APIOPS_PORT": str(port),
    }
    api = await asyncio.create_subprocess_exec(APIOPS, "serve", env=env)
    worker = await start_worker(settings)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers("writer")) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, within=30, interval=0.05)
            yield client
    finally:
        for process in (api, worker):
            await stop(process, signal.SIGTERM)


async def test_the_roles_migrate_and_run_a_job_and_the_runtime_role_cannot_change_the_schema(redis: Redis) -> None:
    async with _roles() as roles:
        await _psql(roles)
        await _psql(roles)  # safe to run again
        admin = await _admin(roles.database)
        try:
            attributes = await admin.fetch(
                "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = ANY($1)",
                [roles.migrator, roles.runtime],
            )
        finally:
            await admin.close()
        assert [tuple(row) for row in attributes] == [(False, False, False)] * 2

        code, out = await run_upgrade(roles.url(roles.migrator))  # no CREATEDB, the database exists
        assert code == 0, out
        assert "created database" not in out

        async with _connect(roles, roles.migrator) as migrator:
            owners = await migrator.fetch("SELECT DISTINCT tableowner FROM pg_tables WHERE tablename LIKE 'ops_%'")
            assert [row["tableowner"] for row in owners] == [roles.migrator]
            # A table a later migration adds: usable by the runtime role through the default privileges alone.
            await migrator.execute("CREATE TABLE ops_later (id bigserial PRIMARY KEY, note text)")

        async with _connect(roles, roles.runtime) as runtime:
            for statement in (
                "CREATE TABLE ops_mine (id int)",
                "ALTER TABLE ops_job ADD COLUMN extra int",
                "CREATE INDEX ON ops_job (actor)",
                "DROP TABLE ops_job_event",
                "TRUNCATE ops_job CASCADE",
                "DELETE FROM ops_job_event",
            ):
                await _refused(runtime, statement)
            new_id = await runtime.fetchval("INSERT INTO ops_later (note) VALUES ('a') RETURNING id")
            await runtime.execute("UPDATE ops_later SET note = 'b' WHERE id = $1", new_id)
            assert await runtime.fetchval("SELECT note FROM ops_later WHERE id = $1", new_id) == "b"
            await _refused(runtime, "DELETE FROM ops_later")

        settings = Settings(
            database_url=roles.url(roles.runtime),
            redis_url=REDIS_URL,
            api_keys=key_entries(),
            queue_name=f"apiops-test:{secrets.token_hex(4)}",
        )
        async with _service(settings) as client:
            response = await client.post("/ops/jobs/noop", json={"steps": 2, "sleep_s": 0.05})
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            job = await wait_for_status(client, job_id, "success", "failed", within=30)
            assert job["status"] == "success", job
            cancelled = await client.post("/ops/jobs/noop", json={"steps": 1, "sleep_s": 30})
            assert (await client.post(f"/ops/jobs/{cancelled.json()['job_id']}/cancel")).status_code == 202
            await wait_for_status(client, cancelled.json()["job_id"], "cancelled", within=30)


async def test_a_database_migrated_by_another_role_is_handed_over_and_migrated_on_by_the_migration_role() -> None:
    """As docs/deployment.md says for a service that ran as `postgres` until now: hand the tables over, run the
    script, and the migration role applies the next migration (an ALTER TABLE, which needs ownership)."""
    async with _roles() as roles:
        engine = create_async_engine(make_url(ADMIN_URL).set(drivername="postgresql+asyncpg", database=roles.database))
        try:
            await migrate(engine, "0003")
        finally:
            await engine.dispose()
        await _psql(roles)
        admin = await _admin(roles.database)
        try:
            for table in ("ops_job", "ops_job_step", "ops_job_event", "alembic_version"):
                await admin.execute(f'ALTER TABLE {table} OWNER TO "{roles.migrator}"')
            await admin.execute(f'ALTER FUNCTION ops_job_event_notify() OWNER TO "{roles.migrator}"')
        finally:
            await admin.close()
        await _psql(roles)  # again: it grants on the tables that exist

        code, out = await run_upgrade(roles.url(roles.migrator))
        assert code == 0, out

        async with _connect(roles, roles.runtime) as runtime:
            assert await runtime.fetchval("SELECT count(state) FROM ops_job") == 0  # 0004's column
            assert await runtime.fetchval("SELECT nextval('ops_job_event_event_id_seq')") == 1
            await _refused(runtime, "ALTER TABLE ops_job DROP COLUMN state")


async def test_db_upgrade_says_in_one_line_that_a_missing_database_needs_createdb() -> None:
    async with _roles() as roles:
        admin = await _admin()
        try:
            await admin.execute(f"CREATE ROLE \"{roles.migrator}\" LOGIN PASSWORD '{roles.password}'")
        finally:
            await admin.close()
        missing = make_url(roles.url(roles.migrator)).set(database=f"{roles.database}_missing")

        code, out = await run_upgrade(missing.render_as_string(hide_password=False))

        assert code == 1
        assert out.strip() == (
            f"apiops: database {missing.database} does not exist, and role {roles.migrator} may not create it "
            f'(no CREATEDB): create it as an administrator (CREATE DATABASE "{missing.database}"), or grant the '
            "role CREATEDB"
        )
