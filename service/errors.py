"""One error base class, rendered in one JSON shape: `{"error": {"code", "message", "details"}}`.

`code` is stable and machine-readable, `message` is for people, `details` is optional and code-specific
(per-field messages for `invalid_params`, the blocking job for `conflict`, ...). No traceback ever leaves.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.db import database_unavailable

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class MalformedJson(ServiceError):
    status_code, code = 400, "malformed_json"


class Unauthorized(ServiceError):
    status_code, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status_code, code = 403, "forbidden"


class NotFound(ServiceError):
    status_code, code = 404, "not_found"


class Conflict(ServiceError):
    status_code, code = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status_code, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code, code = 415, "unsupported_media_type"


class InvalidParams(ServiceError):
    status_code, code = 422, "invalid_params"


class DependencyUnavailable(ServiceError):
    status_code, code = 503, "dependency_unavailable"


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def service_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return JSONResponse(error_body(exc.code, exc.message, exc.details), exc.status_code, headers=exc.headers)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse(error_body(code, message), exc.status_code, headers=exc.headers)


async def database_error_handler(request: Request, exc: Exception) -> Response:
    if not database_unavailable(exc):
        return await unexpected_error_handler(request, exc)
    # Nothing was written: the transaction never reached PostgreSQL, or was rolled back with the connection.
    logger.error("PostgreSQL unavailable on %s %s: %s", request.method, request.url.path, exc)
    message = "the database is unavailable; nothing was changed, try again shortly"
    return JSONResponse(error_body("dependency_unavailable", message, {"dependency": "postgres"}), 503)


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal_error", "internal error; the service log has the details"), 500)


EXCEPTION_HANDLERS = {
    ServiceError: service_error_handler,
    HTTPException: http_error_handler,
    # Connection failures surface as SQLAlchemy's DBAPIError, or as OSError/TimeoutError while connecting.
    DBAPIError: database_error_handler,
    OSError: database_error_handler,
    TimeoutError: database_error_handler,
    Exception: unexpected_error_handler,
}
