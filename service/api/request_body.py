"""A request's JSON body and query, read with the limits of `input_limits` and validated into a pydantic model,
with errors in the service's one shape (400 malformed, 413 too large, 415 not JSON, 422 invalid params)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from service.api.input_limits import MAX_JSON_DEPTH, json_depth, unstorable
from service.errors import InvalidParams, MalformedJson, PayloadTooLarge, UnsupportedMediaType

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to be over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
    return bytes(body)


async def read_json_object(request: Request, limit: int) -> bytes:
    """The body as a JSON object; an empty body means `{}` (every param at its default)."""
    body = await read_body(request, limit)
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


def validate(model: type[M], data: dict[str, Any] | bytes, context: dict[str, Any] | None = None) -> M:
    """Query parameters (a dict of strings) are validated laxly: "50" is a limit. A JSON body (bytes) strictly, in
    JSON mode: `false` or "3" is not a number (lax mode would coerce both), while an integer still fills a float
    and an ISO string a date-time."""
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data, strict=True, context=context)
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        # A query's field is the parameter (`status`, not `status.0` for the first of several values).
        in_query = not isinstance(data, bytes)
        details = [
            {"field": ".".join(str(part) for part in error["loc"][: 1 if in_query else None]) or None,
             "message": error["msg"]}
            for error in exc.errors(include_url=False, include_input=False)
        ]  # fmt: skip
        summary = "; ".join(f"{d['field'] or 'params'}: {d['message']}" for d in details)
        raise InvalidParams(f"invalid params: {summary}", details=details) from None


def query_of(request: Request, repeatable: tuple[str, ...] = ("status",)) -> dict[str, Any]:
    """The query string as `validate` takes it: each parameter once (the last), but those in `repeatable`, which
    keep every value (`status=failed&status=cancelled`; each may also be a comma-separated list)."""
    query: dict[str, Any] = dict(request.query_params)
    for name in repeatable:
        if name in query:
            query[name] = request.query_params.getlist(name)
    return query
