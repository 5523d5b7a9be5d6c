"""Probes: `/livez` (the process answers) and `/readyz` (PostgreSQL and Redis answer, within a short timeout).

Neither needs a key: an orchestrator's probe has none. `/readyz` then says only ready or not: what each check found
(addresses, exception text) is for a caller with a valid key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.api.auth import identify
from service.api.repository import ping
from service.api.state import AppState
from service.errors import DependencyUnavailable


async def livez(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    state = AppState.of(request)
    checks = await readiness(state)
    down = [name for name, result in checks.items() if result != "ok"]
    if await identify(request) is None:
        if down:
            raise DependencyUnavailable("not ready")
        return JSONResponse({"status": "ready"})
    if down:
        raise DependencyUnavailable(f"not ready: {', '.join(down)} unavailable", details={"checks": checks})
    return JSONResponse({"status": "ready", "checks": checks})


async def readiness(state: AppState) -> dict[str, str]:
    """Each dependency's check, in parallel, each within the readiness timeout: "ok" or what went wrong."""

    async def postgres() -> None:
        async with state.engine.connect() as conn:
            await ping(conn)

    async def redis() -> None:
        await state.redis.ping()

    names = ("postgres", "redis")
    results = await asyncio.gather(*(_check(c, state.settings.readiness_timeout_s) for c in (postgres, redis)))
    return dict(zip(names, results, strict=True))


async def _check(probe: Callable[[], Awaitable[None]], timeout_s: float) -> str:
    try:
        async with asyncio.timeout(timeout_s):
            await probe()
    except TimeoutError:
        return f"error: no answer within {timeout_s:g}s"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"


routes = [Route("/livez", livez, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
