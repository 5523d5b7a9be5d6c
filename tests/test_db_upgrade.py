"""`apiops db upgrade` as an operator runs it: it creates the database when it is missing, migrates it to the
latest revision, and running it again changes nothing."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from service.db import asyncpg_dsn
from tests.conftest import ADMIN_URL

APIOPS = str(Path(sys.executable).with_name("apiops"))


async def run_upgrade(database_url: str) -> tuple[int, str]:
    """`apiops db upgrade` against `database_url` alone (no other APIOPS_ setting); its exit status and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIOPS_")}
    env["APIOPS_DATABASE_URL"] = database_url
    process = await asyncio.create_subprocess_exec(
        APIOPS, "db", "upgrade", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_db_upgrade_creates_the_database_and_migrates_it_to_head_idempotently() -> None:
    name = f"apiops_test_upgrade_{secrets.token_hex(4)}"
    database_url = make_url(ADMIN_URL).set(drivername="postgresql+asyncpg", database=name).render_as_string(False)
    try:
        code, out = await run_upgrade(database_url)
        assert code == 0, out
        assert f"created database {name}" in out
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            head = await conn.fetchval("SELECT version_num FROM alembic_version")
            tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
        finally:
            await conn.close()
        assert {"ops_job", "ops_job_step", "ops_job_event"} <= tables
        code, out = await run_upgrade(database_url)
        assert code == 0, out
        assert "created database" not in out
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            assert await conn.fetchval("SELECT version_num FROM alembic_version") == head
        finally:
            await conn.close()
    finally:
        admin = await asyncpg.connect(asyncpg_dsn(ADMIN_URL))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
