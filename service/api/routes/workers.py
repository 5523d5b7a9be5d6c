"""`GET /ops/workers`: the workers alive now (a heartbeat within the last three beats) and the jobs each runs: every
job for the service's operators, the caller's own team's for everyone else (the workers are shared)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.api.auth import Principal, require
from service.api.repository import team_job_ids
from service.api.state import AppState
from service.errors import DependencyUnavailable
from service.heartbeats import live_workers
from service.settings import Scope


async def list_workers(request: Request) -> JSONResponse:
    principal = await require(request, Scope.READ)
    return JSONResponse({"workers": await visible_workers(AppState.of(request), principal)})


async def visible_workers(state: AppState, principal: Principal) -> list[dict[str, Any]]:
    """The live workers, each with the running jobs `principal` may see."""
    try:
        async with asyncio.timeout(state.settings.readiness_timeout_s):
            workers = await live_workers(state.redis, state.settings.queue_name)
    except Exception as exc:
        raise DependencyUnavailable(f"Redis unavailable: {exc}", details={"dependency": "redis"}) from exc
    team = principal.team_filter
    if team is not None:
        async with state.autocommit.connect() as conn:
            visible = await team_job_ids(conn, [job for w in workers for job in w["running"]], team)
        for worker in workers:
            worker["running"] = [job for job in worker["running"] if job in visible]
    return workers


routes = [Route("/ops/workers", list_workers, methods=["GET"])]
