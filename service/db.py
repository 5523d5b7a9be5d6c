"""The one engine factory: connection timeouts, pool size and an `application_name` per process role."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from service.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


def create_engine(settings: Settings, role: str, pre_ping: bool = True) -> AsyncEngine:
    """An engine whose connections say `apiops-<role>` in `pg_stat_activity` and never wait forever.

    `pre_ping` tests each connection as it leaves the pool (one round trip per transaction): the API wants it, so
    that a PostgreSQL restart costs no failed request; the worker does not, as it retries a write whose connection
    turns out dead (service.leases)."""
    return create_async_engine(
        make_url(settings.database_url.get_secret_value()),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=pre_ping,
        pool_timeout=settings.db_connect_timeout_s,
        connect_args={
            "timeout": settings.db_connect_timeout_s,
            "command_timeout": settings.db_command_timeout_s,
            "server_settings": {"application_name": f"apiops-{role}"},
        },
    )


def database_unavailable(exc: BaseException) -> bool:
    """A failure to reach PostgreSQL (worth retrying, or a 503), as opposed to an error in what was asked of it."""
    if isinstance(exc, OSError | TimeoutError | OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The engine in autocommit: a single statement is its own transaction, with no BEGIN/COMMIT round trips."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def create_sessions(engine: AsyncEngine) -> Sessions:
    return async_sessionmaker(engine, expire_on_commit=False)
