"""The migrations build exactly the schema the models describe, and undo it completely."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from service.models import Base
from service.settings import Settings
from tests.conftest import migrate


async def test_migrated_schema_matches_the_models(settings: Settings) -> None:
    engine = create_async_engine(settings.database_url.get_secret_value())

    def diff(connection: Any) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_server_default": True})
        return list(compare_metadata(context, Base.metadata))

    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await engine.dispose()


async def test_downgrade_to_base_removes_everything_and_upgrade_restores_it(settings: Settings) -> None:
    engine = create_async_engine(settings.database_url.get_secret_value())

    async def tables() -> set[str]:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))

    try:
        await migrate(engine, "base", downgrade=True)
        assert await tables() == {"alembic_version"}
        await migrate(engine, "head")
        assert await tables() == {
            "alembic_version",
            "ops_job",
            "ops_job_step",
            "ops_job_event",
            "ops_api_key",
            "ops_job_approval",
        }
    finally:
        await engine.dispose()
