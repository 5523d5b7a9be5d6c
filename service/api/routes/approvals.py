"""`POST /ops/jobs/{job_id}/approve` and `/reject`: the decisions on a job awaiting approval, by people of its team
who hold `jobs:approve` (never the requester's own approval)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.api import actions
from service.api.approvals import Approve, Reject
from service.api.auth import caller_of, require
from service.api.request_body import read_json_object, validate
from service.api.schemas import ModelResponse
from service.api.state import AppState
from service.settings import Scope


async def approve(request: Request) -> Response:
    state = AppState.of(request)
    principal = await require(request, Scope.APPROVE)
    approval = validate(Approve, await read_json_object(request, state.settings.max_body_bytes))
    job = await actions.approve(
        state, principal, caller_of(request, principal), request.path_params["job_id"], approval
    )
    return ModelResponse(job)


async def reject(request: Request) -> Response:
    state = AppState.of(request)
    principal = await require(request, Scope.APPROVE)
    rejection = validate(Reject, await read_json_object(request, state.settings.max_body_bytes))
    job = await actions.reject(
        state, principal, caller_of(request, principal), request.path_params["job_id"], rejection
    )
    return ModelResponse(job)


routes = [
    Route("/ops/jobs/{job_id}/approve", approve, methods=["POST"]),
    Route("/ops/jobs/{job_id}/reject", reject, methods=["POST"]),
]
