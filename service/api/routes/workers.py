"""`GET /ops/workers`: the workers alive now (a heartbeat within the last three beats) and the jobs each runs."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.api.auth import require
from service.api.state import AppState
from service.errors import DependencyUnavailable
from service.heartbeats import live_workers
from service.settings import Scope


async def list_workers(request: Request) -> JSONResponse:
    state = AppState.of(request)
    require(request, Scope.READ)
    try:
        async with asyncio.timeout(state.settings.readiness_timeout_s):
            workers = await live_workers(state.redis, state.settings.queue_name)
    except Exception as exc:
        raise DependencyUnavailable(f"Redis unavailable: {exc}", details={"dependency": "redis"}) from exc
    return JSONResponse({"workers": workers})


routes = [Route("/ops/workers", list_workers, methods=["GET"])]
