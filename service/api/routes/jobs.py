"""`/ops/jobs` and `/ops/job-types`: submit, read and list jobs; list the job types."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.api import actions
from service.api.auth import caller_of, require
from service.api.listing import ListFilter, list_jobs
from service.api.openapi import IDEMPOTENCY_KEY
from service.api.repository import get_events, get_job
from service.api.request_body import query_of, read_json_object, validate
from service.api.schemas import JobPage, JobWithEvents, ModelResponse, job_type_json
from service.api.state import AppState
from service.errors import InvalidParams
from service.settings import Scope


async def submit_job(request: Request) -> Response:
    state = AppState.of(request)
    principal = await require(request, Scope.WRITE)
    type_name = request.path_params["name"]
    state.registry.get(type_name)  # an unknown type is a 404 before the body is read
    key = _idempotency_key(request)
    body = await read_json_object(request, state.settings.max_body_bytes)
    created = await actions.submit(state, principal, caller_of(request, principal), type_name, body, key)
    headers = {"Location": f"/ops/jobs/{created.job.job_id}"}
    return ModelResponse(created.job, status_code=200 if created.replayed else 202, headers=headers)


async def read_job(request: Request) -> Response:
    state = AppState.of(request)
    principal = await require(request, Scope.READ)
    query = validate(ReadQuery, dict(request.query_params))
    # In autocommit: each read is one statement, so no BEGIN and ROLLBACK round trips around it.
    async with state.autocommit.connect() as conn:
        job = await get_job(conn, request.path_params["name"], team=principal.team_filter)
        if query.include != "events":
            return ModelResponse(job)
        events = await get_events(conn, job.job_id)
    return ModelResponse(JobWithEvents(**dict(job), events=events))


async def cancel(request: Request) -> Response:
    principal = await require(request, Scope.WRITE)
    job_id = request.path_params["job_id"]
    job = await actions.cancel(AppState.of(request), principal, caller_of(request, principal), job_id)
    return ModelResponse(job, status_code=202)


async def retry(request: Request) -> Response:
    principal = await require(request, Scope.WRITE)
    job_id = request.path_params["job_id"]
    job = await actions.retry(AppState.of(request), principal, caller_of(request, principal), job_id)
    return ModelResponse(job, status_code=202)


class ReadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include: Literal["events"] | None = None


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if re.fullmatch(IDEMPOTENCY_KEY, key) is None:
        message = "Idempotency-Key must be 1 to 200 printable ASCII characters"
        raise InvalidParams(message, details=[{"field": "Idempotency-Key", "message": message}])
    return key


class ListQuery(ListFilter):
    model_config = ConfigDict(extra="forbid")

    limit: Annotated[int, Field(ge=1, le=200)] = 50
    cursor: str | None = None


async def list_job_page(request: Request) -> Response:
    state = AppState.of(request)
    principal = await require(request, Scope.READ)
    query = validate(ListQuery, query_of(request))
    filters = principal.confine(ListFilter.within(query))
    if filters is None:
        return ModelResponse(JobPage(jobs=[], next_cursor=None))  # another team's jobs: as if there were none
    async with state.autocommit.connect() as conn:
        page = await list_jobs(conn, filters, query.limit, query.cursor)
    return ModelResponse(page)


async def list_job_types(request: Request) -> JSONResponse:
    state = AppState.of(request)
    await require(request, Scope.READ)
    return JSONResponse({"job_types": [job_type_json(job_type) for job_type in state.registry]})


class JobOrType(HTTPEndpoint):
    """`/ops/jobs/{name}`: a job type's URL takes POST (submit a job of that type), any other names a job, read with
    GET (a job id is never a type's name). One route for both; the methods a URL takes, and a 405's `Allow`, are
    those of the URL itself, as the OpenAPI document lists them (where a concrete path wins over a template)."""

    async def get(self, request: Request) -> Response:
        if _names_a_type(request):
            return await self.method_not_allowed(request)
        return await read_job(request)

    async def post(self, request: Request) -> Response:
        # Any other name is an unknown type: a 404 that lists the known ones says more than a 405 would.
        return await submit_job(request)

    async def method_not_allowed(self, request: Request) -> Response:
        raise HTTPException(405, headers={"Allow": "POST" if _names_a_type(request) else "GET, HEAD"})


def _names_a_type(request: Request) -> bool:
    return request.path_params["name"] in AppState.of(request).registry


routes = [
    Route("/ops/jobs", list_job_page, methods=["GET"]),
    Route("/ops/jobs/{name}", JobOrType),
    Route("/ops/jobs/{job_id}/cancel", cancel, methods=["POST"]),
    Route("/ops/jobs/{job_id}/retry", retry, methods=["POST"]),
    Route("/ops/job-types", list_job_types, methods=["GET"]),
]
