"""One error base class, rendered in one JSON shape: `{"error": {"code", "message", "details"}}`.

`code` is stable and machine-readable, `message` is for people, `details` is optional and code-specific
(per-field messages for `invalid_params`, the blocking job for `conflict`, ...). No traceback ever leaves.

Plain exceptions, free of any web framework: the job SDK and the worker raise them too. The API renders them
(`service.api.error_handlers`).
"""

from __future__ import annotations

from typing import Any


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
