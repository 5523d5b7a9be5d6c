"""The one engine factory: connection timeouts, pool size and an `application_name` per process role."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, InvalidatePoolError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from service.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


# A pooled connection idle for longer than this is tested before use.
PING_AFTER_IDLE_S = 1.0


def create_engine(settings: Settings, role: str, pre_ping: bool = True) -> AsyncEngine:
    """An engine whose connections say `apiops-<role>` in `pg_stat_activity` and never wait forever.

    With `pre_ping`, a connection that sat idle in the pool for over PING_AFTER_IDLE_S is tested as it leaves it,
    so that a PostgreSQL restart (or an idle connection dropped in between) costs no failed request. Connections in
    steady use are not pinged: that round trip cost the API an eighth of its CPU under load (`make bench`), and
    a connection lost while busy is found by the request using it, which invalidates the whole pool. The worker
    needs no ping: it retries a write whose connection turns out dead (jobs.runtime.leases)."""
    engine = create_async_engine(
        make_url(settings.database_url.get_secret_value()),
        # A fixed pool: a burst waits for a connection (a statement takes about a millisecond) instead of opening
        # overflow connections that are closed again at once. That churn (connect, SSL negotiation, re-preparing
        # statements) cost the API a third of its submit throughput from the second thousand requests on.
        pool_size=settings.db_pool_size,
        max_overflow=0,
        pool_timeout=settings.db_connect_timeout_s,
        # An error's message then shows the statement without its values: they hold params, targets and idempotency
        # keys, which no log line may carry.
        hide_parameters=True,
        connect_args={
            "timeout": settings.db_connect_timeout_s,
            "command_timeout": settings.db_command_timeout_s,
            # UTC: the times PostgreSQL renders itself (in JSON) then read like those asyncpg decodes.
            "server_settings": {"application_name": f"apiops-{role}", "timezone": "UTC"},
        },
    )
    if pre_ping:
        _ping_after_idle(engine, PING_AFTER_IDLE_S)
    return engine


def _ping_after_idle(engine: AsyncEngine, idle_s: float) -> None:
    pool, dialect = engine.sync_engine.pool, engine.sync_engine.dialect

    @event.listens_for(pool, "checkin")
    def checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < idle_s:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool replaces this connection, and every other one opened before now.
            raise InvalidatePoolError(f"connection idle for {time.monotonic() - idle_since:.0f}s is gone") from exc


def asyncpg_dsn(database_url: str, database: str | None = None) -> str:
    """SQLAlchemy's URL (`postgresql+asyncpg://...`) as a DSN asyncpg itself takes; of `database` when given
    (`postgres`, the maintenance database, to create or drop one)."""
    url = make_url(database_url).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


# A failure to reach PostgreSQL: SQLAlchemy's, or what asyncpg itself raises (statements sent straight to the driver,
# see jobs.runtime.leases) for a connection lost, or a server shutting down or starting up. A pool whose every
# connection is held by statements that get no answer (a stalled server or network) times out the next checkout.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    PoolTimeoutError,
    OperationalError,
    InterfaceError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)


def database_unavailable(exc: BaseException) -> bool:
    """A failure to reach PostgreSQL (worth retrying, or a 503), as opposed to an error in what was asked of it."""
    if isinstance(exc, _UNAVAILABLE):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The engine in autocommit: a single statement is its own transaction, with no BEGIN/COMMIT round trips."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def create_sessions(engine: AsyncEngine) -> Sessions:
    return async_sessionmaker(engine, expire_on_commit=False)
