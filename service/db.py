"""The one engine factory: connection timeouts, pool size and an `application_name` per process role."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from service.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


def create_engine(settings: Settings, role: str) -> AsyncEngine:
    """An engine whose connections say `apiops-<role>` in `pg_stat_activity` and never wait forever."""
    return create_async_engine(
        make_url(settings.database_url.get_secret_value()),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=True,
        pool_timeout=settings.db_connect_timeout_s,
        connect_args={
            "timeout": settings.db_connect_timeout_s,
            "command_timeout": settings.db_command_timeout_s,
            "server_settings": {"application_name": f"apiops-{role}"},
        },
    )


def create_sessions(engine: AsyncEngine) -> Sessions:
    return async_sessionmaker(engine, expire_on_commit=False)
