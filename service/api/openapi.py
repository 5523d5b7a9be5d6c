"""The OpenAPI 3.1 document of the API, built from the same pydantic models that validate requests and shape
responses, so that it cannot drift from them. Each job type gets its own `POST /ops/jobs/<type>` operation with
its params schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api.keys import KeyList, KeyOut, MintedKey, NewKey
from service.api.schemas import EventOut, JobOut, JobPage, JobTypeOut, JobWithEvents
from service.jobtypes import Registry
from service.models import EventKind, JobStatus

REF = "#/components/schemas/{model}"

_ERRORS = {
    400: (
        "malformed_json: the body is not JSON, nests deeper than 32 levels or holds a number too long to read; "
        "bad_request: a NUL (%00) in the URL"
    ),
    401: "unauthorized: no API key, or an unknown one",
    403: "forbidden: the key lacks the scope, or may not act on the job's target",
    404: "not_found / unknown_job_type",
    405: "method_not_allowed",
    409: "conflict: the target is busy, or the job's state does not allow this",
    413: "payload_too_large: the body is over the limit",
    415: "unsupported_media_type: a body that is not application/json",
    422: "invalid_params: params, query parameters or headers that do not validate (one entry per field)",
    503: "dependency_unavailable: PostgreSQL (or, for /readyz, Redis) is unreachable",
}

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "stable and machine-readable"},
                "message": {"type": "string", "description": "for people"},
                "details": {"description": "code-specific: per-field messages, the blocking job, ..."},
            },
        }
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": _ERRORS[c], "content": _json(_ref("Error"))} for c in codes}


def _operation(summary: str, responses: dict[str, Any], *codes: int, **extra: Any) -> dict[str, Any]:
    # Every route may answer 400: a NUL in the URL is refused before any route (service.api.input_limits).
    return {"summary": summary, "responses": {**responses, **_errors(400, *codes)}, **extra}


def _ok(description: str, schema: dict[str, Any], status: int = 200) -> dict[str, Any]:
    return {str(status): {"description": description, "content": _json(schema)}}


# What a URL may not hold: a NUL (`%00`) is refused before any route (service.api.input_limits).
NO_NUL = "^[^\\u0000]*$"
# An Idempotency-Key: printable ASCII, as a header value is on the wire (service.api.routes.jobs).
IDEMPOTENCY_KEY = "^[\\x20-\\x7e]{1,200}$"


def _path_param(name: str, description: str) -> dict[str, Any]:
    schema = {"type": "string", "pattern": NO_NUL}
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
    "description": "resume after this event",
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    if schema.get("type") == "string" and "enum" not in schema:
        schema = {**schema, "pattern": NO_NUL}
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def openapi_document(registry: Registry) -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        JobOut, JobWithEvents, JobPage, EventOut, JobTypeOut, NewKey, KeyOut, KeyList, MintedKey,
        *(t.params for t in registry),
    ]  # fmt: skip
    _, definitions = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas: dict[str, Any] = {**definitions.get("$defs", {}), "Error": _ERROR_SCHEMA}
    job = _ref("JobOut")
    job_id = _path_param("job_id", "the job's id, e.g. `noop-01m8mbm2aekn3wj4fwy2404maz`")
    paths: dict[str, Any] = {}

    for job_type in registry:
        paths[f"/ops/jobs/{job_type.name}"] = {
            "post": _operation(
                f"Submit a {job_type.name} job",
                {
                    **_ok("the job created (202), with a Location header", job, 202),
                    **_ok("the job an earlier request with this Idempotency-Key created", job),
                },
                400,
                401,
                403,
                409,
                413,
                415,
                422,
                503,
                description=job_type.description,
                parameters=[
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY},
                        "description": "the same key from the same actor within 24 h returns the original job",
                    }
                ],
                requestBody={"required": False, "content": _json(_ref(job_type.params.__name__))},
            )  # fmt: skip
        }

    paths["/ops/jobs"] = {
        "get": _operation(
            "List jobs, newest first",
            _ok("one page, and the cursor of the next (null on the last)", _ref("JobPage")),
            401,
            403,
            422,
            503,
            parameters=[
                _query("type", {"type": "string"}, "only jobs of this type"),
                _query(
                    "status",
                    {"type": "array", "items": {"type": "string", "enum": [s.value for s in JobStatus]}},
                    "only jobs of these statuses: repeat the parameter, or separate them with commas",
                ),
                _query("actor", {"type": "string"}, "only jobs created with this key name"),
                _query("target", {"type": "string"}, "only jobs acting on this target"),
                _query(
                    "team", {"type": "string"}, "only this team's jobs (keys other than `admin` see only their own)"
                ),
                _query("since", {"type": "string", "format": "date-time"}, "only jobs created at or after"),
                _query("until", {"type": "string", "format": "date-time"}, "only jobs created before"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "page size"),
                _query("cursor", {"type": "string"}, "`next_cursor` of the previous page, unchanged"),
            ],
        )  # fmt: skip
    }
    paths["/ops/jobs/{job_id}"] = {
        "get": _operation(
            "A job with its ordered steps",
            _ok("the job; with `include=events`, its history too", {"anyOf": [job, _ref("JobWithEvents")]}),
            401,
            403,
            404,
            422,
            503,
            parameters=[job_id, _query("include", {"type": "string", "enum": ["events"]}, "add the job's history")],
        )  # fmt: skip
    }
    paths["/ops/jobs/{job_id}/cancel"] = {
        "post": _operation(
            "Cancel a pending or running job (your own with jobs:write, anyone's with jobs:admin)",
            _ok("the job: cancelled, or (running) cancel requested", job, 202),
            401,
            403,
            404,
            409,
            503,
            parameters=[job_id],
        )  # fmt: skip
    }
    paths["/ops/jobs/{job_id}/retry"] = {
        "post": _operation(
            "Run a failed or cancelled job again from its first unfinished step",
            _ok("the job, pending again", job, 202),
            401,
            403,
            404,
            409,
            503,
            parameters=[job_id],
        )  # fmt: skip
    }
    reason = {"type": "string", "minLength": 1, "maxLength": 1000}

    def decision(summary: str, answer: str, reason_required: bool) -> dict[str, Any]:
        body = {"type": "object", "properties": {"reason": reason}, "additionalProperties": False}
        body |= {"required": ["reason"]} if reason_required else {}
        return {
            "post": _operation(
                summary,
                _ok(answer, job),
                401,
                403,
                404,
                409,
                413,
                415,
                422,
                503,
                parameters=[job_id],
                requestBody={"required": reason_required, "content": _json(body)},
            )  # fmt: skip
        }

    paths["/ops/jobs/{job_id}/approve"] = decision(
        "Approve a job of your team awaiting approval (jobs:approve; never your own); enough run it",
        "the job: still awaiting approval, or pending",
        reason_required=False,
    )
    paths["/ops/jobs/{job_id}/reject"] = decision(
        "Reject a job awaiting approval (scope jobs:approve); it ends rejected and never runs",
        "the job, rejected",
        reason_required=True,
    )
    paths["/ops/jobs/{job_id}/events"] = {
        "get": _operation(
            "The job's history, then its changes live (Server-Sent Events); ends after the job finishes",
            {
                "200": {
                    "description": "`id: <event_id>`, `event: <kind>`, `data: <Event as JSON>` per message",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                }
            },
            401,
            403,
            404,
            422,
            503,
            parameters=[
                job_id,
                LAST_EVENT_ID,
            ],
        )  # fmt: skip
    }
    paths["/ops/events"] = {
        "get": _operation(
            "Every event of the jobs the key may see, live (Server-Sent Events), filtered as the job list is",
            {
                "200": {
                    "description": "`id: <event_id>`, `event: <kind>`, `data: <Event as JSON with job_id, job_type, "
                    "job_target and job_status>` per message; from `Last-Event-ID` (or `after`) on when given, else "
                    "from now on; at least once across a resume",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                }
            },
            401,
            403,
            422,
            503,
            parameters=[
                _query("type", {"type": "string"}, "only events of jobs of this type"),
                _query(
                    "status",
                    {"type": "array", "items": {"type": "string", "enum": [s.value for s in JobStatus]}},
                    "only events of jobs whose status, when the event is sent, is one of these",
                ),
                _query("actor", {"type": "string"}, "only events of jobs created with this key name"),
                _query("target", {"type": "string"}, "only events of jobs acting on this target"),
                _query("team", {"type": "string"}, "only events of this team's jobs (`admin` keys see every team's)"),
                _query(
                    "kind",
                    {"type": "array", "items": {"type": "string", "enum": [k.value for k in EventKind]}},
                    "only events of these kinds: repeat the parameter, or separate them with commas",
                ),
                _query("after", {"type": "string", "pattern": "^[0-9]+$"}, "resume after this event"),
                LAST_EVENT_ID,
            ],
        )  # fmt: skip
    }
    paths["/ops/job-types"] = {
        "get": _operation(
            "The registered job types, with their params schema and steps",
            _ok(
                "every job type",
                {
                    "type": "object",
                    "required": ["job_types"],
                    "properties": {"job_types": {"type": "array", "items": _ref("JobTypeOut")}},
                },
            ),
            401,
            403,
        )  # fmt: skip
    }
    paths["/ops/workers"] = {
        "get": _operation(
            "Workers alive now (a heartbeat within 15 s) and the jobs each runs",
            _ok(
                "the live workers",
                {
                    "type": "object",
                    "required": ["workers"],
                    "properties": {"workers": {"type": "array", "items": {"type": "object"}}},
                },
            ),
            401,
            403,
            503,
        )  # fmt: skip
    }
    paths["/ops/keys"] = {
        "post": _operation(
            "Mint an API key (scope admin); the key itself is in this answer only",
            _ok("the new key, with `key`", _ref("MintedKey"), 201),
            401,
            403,
            413,
            415,
            422,
            503,
            requestBody={"required": True, "content": _json(_ref("NewKey"))},
        ),
        "get": _operation(
            "Every managed key, newest first (scope admin): never the key nor its hash",
            _ok("the keys", _ref("KeyList")),
            401,
            403,
            503,
        ),
    }
    paths["/ops/keys/{key_id}"] = {
        "delete": _operation(
            "Revoke a key (scope admin): every API process refuses it from the revocation's commit on",
            _ok("the key, revoked", _ref("KeyOut")),
            401,
            403,
            404,
            409,
            503,
            parameters=[_path_param("key_id", "the key's id, e.g. `key-01m8mbm2aekn3wj4fwy2404maz`")],
        ),
    }
    probe: dict[str, Any] = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
    paths["/livez"] = {"get": {"summary": "The process answers", "security": [], "responses": _ok("alive", probe)}}
    checks = {"type": "object", "description": "each dependency's check; only to a caller with a valid key"}
    paths["/readyz"] = {
        "get": _operation(
            "PostgreSQL and Redis answer within the readiness timeout",
            _ok("ready", {**probe, "properties": {**probe["properties"], "checks": checks}}),
            503,
            description=(
                "No key needed; without a valid one the answer says ready or not ready (503) and nothing else. With "
                "any valid key it also names each dependency's check, and on 503 what failed (`details.checks`)."
            ),
            security=[{}, {"ApiKey": []}],
        )
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics (keep it off the public network)",
            "security": [],
            "responses": {
                "200": {
                    "description": "text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {"summary": "This document", "security": [], "responses": _ok("OpenAPI 3.1", {"type": "object"})}
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ApiOps",
            "version": "1",
            "description": 'Operational jobs over HTTP. Errors: `{"error": {"code", "message", "details"}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "security": [{"ApiKey": []}],
    }
