"""How the API answers an error: every `ServiceError`, HTTP error and database failure in the one JSON shape of
`service.errors`; anything unexpected as a 500 that says only where to look (the log), never a traceback."""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.db import database_unavailable
from service.errors import ServiceError, error_body

logger = logging.getLogger(__name__)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ErrorResponse(JSONResponse):
    """An error in the one shape, as ASCII JSON: a message may quote what the client sent (a field name, a value),
    lone UTF-16 surrogates included, which `\\u` escapes carry and UTF-8 cannot (Starlette's JSONResponse would fail
    to encode them, and the client would get a 500 instead of its 422)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


async def service_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return ErrorResponse(error_body(exc.code, exc.message, exc.details), exc.status_code, headers=exc.headers)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    return ErrorResponse(error_body(code, message), exc.status_code, headers=exc.headers)


async def database_error_handler(request: Request, exc: Exception) -> Response:
    if not database_unavailable(exc):
        return await unexpected_error_handler(request, exc)
    # Nothing was written: the transaction never reached PostgreSQL, or was rolled back with the connection.
    logger.error("PostgreSQL unavailable on %s %s: %s", request.method, request.url.path, exc)
    message = "the database is unavailable; nothing was changed, try again shortly"
    return ErrorResponse(error_body("dependency_unavailable", message, {"dependency": "postgres"}), 503)


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return ErrorResponse(error_body("internal_error", "internal error; the service log has the details"), 500)


EXCEPTION_HANDLERS = {
    ServiceError: service_error_handler,
    HTTPException: http_error_handler,
    # Connection failures surface as SQLAlchemy's DBAPIError, or as OSError/TimeoutError while connecting; a stalled
    # database as the pool's timeout.
    DBAPIError: database_error_handler,
    PoolTimeoutError: database_error_handler,
    OSError: database_error_handler,
    TimeoutError: database_error_handler,
    Exception: unexpected_error_handler,
}
