"""Pure ASGI middleware: a request id on every request (logged, and returned as `X-Request-ID`), one access line,
and the request's HTTP metrics, all from one pass over the response."""

from __future__ import annotations

import logging
import re
import secrets
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.metrics import ApiMetrics
from service.logs import log_context

logger = logging.getLogger("service.access")

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


class RequestContext:
    """Tags each request with an id (the caller's `X-Request-ID` if sane, else a new one), logs one line and
    records it in the HTTP metrics."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = Headers(scope=scope).get("x-request-id", "")
        request_id = offered if _VALID_ID.match(offered) else secrets.token_hex(8)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                self.metrics.observe_request(scope, status, elapsed)
                logger.info("%s %s %d %.1fms", scope["method"], scope["path"], status, elapsed * 1000)
