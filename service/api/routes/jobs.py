"""`/ops/jobs` and `/ops/job-types`: submit, read and list jobs; list the job types."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.api.auth import Principal, client_ip, require
from service.api.input_limits import MAX_JSON_DEPTH, json_depth, unstorable
from service.api.openapi import IDEMPOTENCY_KEY
from service.api.repository import (
    Caller,
    ListFilter,
    cancel_job,
    create_job,
    get_events,
    get_job,
    list_jobs,
    retry_job,
)
from service.api.schemas import JobOut, JobWithEvents, ModelResponse, job_type_json
from service.api.state import AppState
from service.errors import InvalidParams, MalformedJson, PayloadTooLarge, UnsupportedMediaType
from service.queue import enqueue
from service.settings import Scope

M = TypeVar("M", bound=BaseModel)


async def submit_job(request: Request) -> Response:
    state = AppState.of(request)
    principal = require(request, Scope.WRITE)
    job_type = state.registry.get(request.path_params["name"])
    key = _idempotency_key(request)
    body = await _read_json_object(request, state.settings.max_body_bytes)
    params = _validate(job_type.params, body, context=state.registry.params_context(job_type.name))
    async with state.autocommit.connect() as conn:
        created = await create_job(conn, job_type, params, _caller(request, principal), key)
    job = created.job
    headers = {"Location": f"/ops/jobs/{job.job_id}"}
    if created.replayed:
        return ModelResponse(job, status_code=200, headers=headers)
    # Only after the commit: a worker must never receive an id whose row it cannot see yet.
    await _enqueue(state, job)
    return ModelResponse(job, status_code=202, headers=headers)


async def read_job(request: Request) -> Response:
    state = AppState.of(request)
    require(request, Scope.READ)
    query = _validate(ReadQuery, dict(request.query_params))
    # In autocommit: each read is one statement, so no BEGIN and ROLLBACK round trips around it.
    async with state.autocommit.connect() as conn:
        job = await get_job(conn, request.path_params["name"])
        if query.include != "events":
            return ModelResponse(job)
        events = await get_events(conn, job.job_id)
    return ModelResponse(JobWithEvents(**dict(job), events=events))


async def cancel(request: Request) -> Response:
    state = AppState.of(request)
    principal = require(request, Scope.WRITE)
    async with state.autocommit.connect() as conn:
        job = await cancel_job(
            conn, request.path_params["job_id"], _caller(request, principal), principal.allows(Scope.ADMIN)
        )
    return ModelResponse(job, status_code=202)


async def retry(request: Request) -> Response:
    state = AppState.of(request)
    principal = require(request, Scope.WRITE)
    async with state.autocommit.connect() as conn:
        job = await retry_job(
            conn, request.path_params["job_id"], _caller(request, principal), principal.allows(Scope.ADMIN)
        )
    await _enqueue(state, job)
    return ModelResponse(job, status_code=202)


class ReadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include: Literal["events"] | None = None


def _caller(request: Request, principal: Principal) -> Caller:
    return Caller(principal.name, client_ip(request, AppState.of(request).settings.trusted_proxies))


async def _enqueue(state: AppState, job: JobOut) -> None:
    await enqueue(
        state.redis,
        job.job_id,
        job.attempt,
        queue_name=state.settings.queue_name,
        timeout_s=state.settings.enqueue_timeout_s,
    )


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
    require(request, Scope.READ)
    query = _validate(ListQuery, dict(request.query_params))
    filters = ListFilter.model_validate(query.model_dump(include=set(ListFilter.model_fields)))
    async with state.autocommit.connect() as conn:
        page = await list_jobs(conn, filters, query.limit, query.cursor)
    return ModelResponse(page)


async def list_job_types(request: Request) -> JSONResponse:
    state = AppState.of(request)
    require(request, Scope.READ)
    return JSONResponse({"job_types": [job_type_json(job_type) for job_type in state.registry]})


async def _read_json_object(request: Request, limit: int) -> bytes:
    """The body as a JSON object; an empty body means `{}` (every param at its default)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
    if not body.strip():
        return b"{}"
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"expected Content-Type: application/json, got {media_type or 'none'!r}",
            details={"expected": "application/json"},
        )
    if json_depth(body) > MAX_JSON_DEPTH:
        raise MalformedJson(f"body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedJson(f"body is not valid JSON: {exc}") from None
    except ValueError:  # Python's own guard: an integer of more than 4,300 digits
        raise MalformedJson("body holds a number of more digits than this service reads (4300)") from None
    if not isinstance(data, dict):
        raise InvalidParams(
            "params must be a JSON object", details=[{"field": None, "message": "expected a JSON object"}]
        )
    where = unstorable(data)
    if where is not None:
        message = "holds a NUL character or a lone UTF-16 surrogate, which cannot be stored"
        raise InvalidParams(f"invalid params: {where}: {message}", details=[{"field": where, "message": message}])
    return bytes(body)


def _validate(model: type[M], data: dict[str, Any] | bytes, context: dict[str, Any] | None = None) -> M:
    """Query parameters (a dict of strings) are validated laxly: "50" is a limit. A JSON body (bytes) strictly, in
    JSON mode: `false` or "3" is not a number (lax mode would coerce both), while an integer still fills a float
    and an ISO string a date-time."""
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data, strict=True, context=context)
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        details = [
            {"field": ".".join(str(part) for part in error["loc"]) or None, "message": error["msg"]}
            for error in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{d['field'] or 'params'}: {d['message']}" for d in details)
        raise InvalidParams(f"invalid params: {summary}", details=details) from None


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
