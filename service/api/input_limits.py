"""What the API refuses before it reaches the JSON parser or PostgreSQL, each with a 4xx that says why.

- JSON nested deeper than MAX_JSON_DEPTH: Python's parser would recurse until RecursionError and the connection
  would be reset with no answer; no job's params need more than a few levels.
- A number of more digits than Python converts (4,300, a guard of the interpreter's own against quadratic time).
- Text PostgreSQL cannot store: NUL (in `text` and `jsonb` alike) and lone UTF-16 surrogates (`\\ud800` in JSON,
  not UTF-8 at all). In a body they would fail the insert with a 500; in a URL (`%00` in a job id or a filter)
  they would fail the read.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_body

MAX_JSON_DEPTH = 32

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(body: bytes | bytearray) -> int:
    """How deeply the JSON text nests arrays and objects (brackets inside strings do not count)."""
    depth = deepest = 0
    for char in _STRING.sub(b'""', body):
        if char in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in b"]}":
            depth -= 1
    return deepest


def unstorable(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value a string (or key) holds what PostgreSQL cannot store; None when nothing does."""
    if isinstance(value, str):
        return path or "(the value)" if not _storable(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if not _storable(str(key)):
                return where
            found = unstorable(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = unstorable(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


class RefuseUnstorableUrls:
    """Pure ASGI: a path or query string holding NUL (`%00`) is a 400 before any route or query sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query: bytes = scope.get("query_string", b"")
            if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
                message = "the URL holds a NUL character (%00), which no job id, filter or cursor can contain"
                await JSONResponse(error_body("bad_request", message), 400)(scope, receive, send)
                return
        await self.app(scope, receive, send)
