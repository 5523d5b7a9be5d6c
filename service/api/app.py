"""The ASGI application: routes, error handlers, middleware, and the lifespan that owns the connections."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

from starlette.applications import Starlette
from starlette.middleware import Middleware

from jobs.registry import REGISTRY
from service.api.auth import KeyRing
from service.api.console import pages as console_pages
from service.api.error_handlers import EXCEPTION_HANDLERS
from service.api.event_hub import EventHub
from service.api.input_limits import RefuseUnstorableUrls
from service.api.keys import CHANNEL as KEY_CHANNEL
from service.api.keys import KeyStore
from service.api.metrics import ApiMetrics
from service.api.middleware import RequestContext
from service.api.routes import approvals, docs, events, health, jobs, keys, workers
from service.api.session import Sessions
from service.api.state import AppState
from service.db import autocommit, create_engine
from service.jobtypes import Registry
from service.logs import configure_logging
from service.queue import create_redis
from service.settings import INVALID_SETTINGS, Settings, settings_or_exit

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> Starlette:
    """The app; without arguments (`uvicorn service.api.app:create_app --factory`), with the environment's settings
    and the registered job types. An invalid setting is said in one line naming its variable, and the process
    exits 2: here, before the server runs the lifespan (which would log a traceback around it)."""
    settings = settings or settings_or_exit("api")
    registry = registry or REGISTRY
    configure_logging(settings)  # from the server's first line on, however it was started
    registry.load_settings_or_exit()
    _policies_name_known_types_or_exit(settings, registry)
    _session_secret_in_prod_or_exit(settings)
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, AppState]]:
        configure_logging(settings)  # again: a server configured after the app was made (tests) has its own
        engine = create_engine(settings, "api")
        redis = create_redis(settings)
        in_autocommit = autocommit(engine)
        hub = EventHub(settings, in_autocommit)
        key_store = KeyStore(in_autocommit)
        hub.also_listen(KEY_CHANNEL, key_store.forget, key_store.hear)
        hub.start()  # revocations are heard from the start, not from the first event stream on
        # Everything loaded so far lives as long as the process: keep it out of the cyclic collector's full passes,
        # which otherwise stall requests by up to ~200 ms (measured by `make bench`).
        gc.freeze()
        restore_signals = _end_streams_on_stop_signals(hub)
        try:
            yield {
                "app": AppState(
                    settings=settings,
                    engine=engine,
                    autocommit=in_autocommit,
                    redis=redis,
                    registry=registry,
                    keyring=KeyRing.from_settings(settings, key_store),
                    keys=key_store,
                    hub=hub,
                    sessions=Sessions.from_settings(settings),
                )
            }
        finally:
            restore_signals()
            await hub.close()
            await redis.aclose(close_connection_pool=True)
            await engine.dispose()

    app = Starlette(
        routes=[
            *jobs.routes,
            *approvals.routes,
            *events.routes,
            *keys.routes,
            *workers.routes,
            *health.routes,
            *docs.routes,
            metrics.route(),
            *console_pages.routes,
        ],  # fmt: skip
        middleware=[Middleware(RequestContext, metrics=metrics), Middleware(RefuseUnstorableUrls)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    # A path with a trailing slash is a 404 like any other unknown path. Starlette's redirect to the path without it
    # is built from the request's Host header, before authentication: an open redirect to wherever the client says.
    app.router.redirect_slashes = False
    return app


def _policies_name_known_types_or_exit(settings: Settings, registry: Registry) -> None:
    """A policy for a job type the service does not know would never apply: a misspelt name must not silently let
    production jobs run without approval."""
    unknown = sorted({p.job_type for p in settings.approval_policies} - {t.name for t in registry})
    for name in unknown:
        known = ", ".join(sorted(t.name for t in registry))
        logger.error(
            "APIOPS_APPROVAL_POLICIES names job type %r, which this service does not have; known: %s", name, known
        )
    if unknown:
        raise SystemExit(INVALID_SETTINGS)


def _session_secret_in_prod_or_exit(settings: Settings) -> None:
    """In prod, console sessions must outlive a restart and hold across replicas: one secret, configured. (The API
    alone signs sessions: the worker and the migrations run without it.)"""
    if settings.dev_mode or settings.session_secret is not None:
        return
    logger.error(
        "APIOPS_ENV=prod needs APIOPS_SESSION_SECRET (32 random characters at least, the same on every API replica: "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) to sign the console's sessions"
    )
    raise SystemExit(INVALID_SETTINGS)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _end_streams_on_stop_signals(hub: EventHub) -> Callable[[], None]:
    """When the server is told to stop, end the live event streams first, so that its graceful stop takes as long as
    the slowest ordinary request rather than its whole grace period (it waits for every open connection).

    The server (uvicorn, however it was started) has installed its own handlers before the app starts: each is
    chained, never replaced. Where no server handles the signals (the app in a test's transport), nothing is
    installed. Returns what puts the server's handlers back."""
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def stopping(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(hub.end_streams)
        server_handler = previous[signal.Signals(sig)]
        assert callable(server_handler)
        server_handler(sig, frame)

    # Python's own SIGINT handler (KeyboardInterrupt) is no server's: nothing to chain to there either.
    chained = [sig for sig, handler in previous.items() if callable(handler) and handler != signal.default_int_handler]
    try:
        for sig in chained:
            signal.signal(sig, stopping)
    except ValueError:  # handlers can be set from the main thread only: elsewhere, streams wait out the grace
        return lambda: None

    def restore() -> None:
        for sig in chained:
            if signal.getsignal(sig) is stopping:
                signal.signal(sig, previous[sig])

    return restore
