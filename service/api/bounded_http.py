"""The HTTP server's own bounds: uvicorn's httptools protocol with a limit on the request head's size, a deadline for
reading it, and a cap on client connections. `apiops serve` runs uvicorn with it (`--http
service.api.bounded_http:BoundedHttpProtocol` on uvicorn's command line); the bounds are `APIOPS_MAX_HEADER_BYTES`,
`APIOPS_HEADER_TIMEOUT_S` and `APIOPS_MAX_CONNECTIONS`. It also serves the app without uvicorn's proxy-headers
middleware, whatever uvicorn's command line says.

uvicorn has none of the three: llhttp buffers a header of any size (120 MiB cost 12 s of CPU and stalled every other
request), a connection that never finishes its headers is kept for ever, and `--limit-concurrency` answers 503 only
to a request whose headers are complete, so idle or half-sent connections still use up the file limit until
`accept` fails and the server answers nobody. Here:

- a head over the limit is refused with 431 once the limit is read, before the parser buffers more;
- a head not complete within the deadline closes the connection (408 if it had begun);
- at the connection cap, a new connection takes the place of the one that has waited longest without a request in
  flight (never sent its headers, or idle between kept-alive requests); only when every connection has a request
  in flight is the new one refused, at once, with 503. A burst of slow connections then costs its own oldest
  members, not `/livez` or an honest client, whose headers arrive in one packet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from weakref import WeakKeyDictionary

from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.errors import error_body
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)

# File descriptors kept for what is not a client connection, besides the PostgreSQL pool: the listening socket, the
# event loop's own, the LISTEN connection of event streams, Redis, log files. `apiops serve` uses about 20.
RESERVED_FDS = 64

# After a refusal (431), the connection stays open this long, not reading, before it is closed: closed at once with
# unread data, it would be reset, and a client still sending could lose the answer before reading it.
LINGER_S = 1.0


@dataclass(frozen=True)
class Bounds:
    max_header_bytes: int
    header_timeout_s: float
    max_connections: int


def bounds_for(settings: Settings, file_limit: int) -> Bounds:
    """The bounds for `settings` in a process that may open `file_limit` files (RLIMIT_NOFILE): the connection cap
    is lowered to leave RESERVED_FDS and the PostgreSQL pool free, so that `accept` never fails for want of one."""
    room = file_limit - RESERVED_FDS - settings.db_pool_size
    cap = max(1, min(settings.max_connections, room))
    if cap < settings.max_connections:
        logger.warning(
            "serving at most %d connections, not APIOPS_MAX_CONNECTIONS=%d: the file limit (ulimit -n) is %d; "
            "raise it to at least %d for that many",
            cap, settings.max_connections, file_limit, settings.max_connections + RESERVED_FDS + settings.db_pool_size,
        )  # fmt: skip
    return Bounds(settings.max_header_bytes, settings.header_timeout_s, cap)


@lru_cache(maxsize=1)
def _process_bounds() -> Bounds:
    return bounds_for(get_settings(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])


# Per server: its connections without a request in flight, longest waiting first (a dict keeps insertion order).
_waiting: WeakKeyDictionary[ServerState, dict[BoundedHttpProtocol, None]] = WeakKeyDictionary()


class BoundedHttpProtocol(HttpToolsProtocol):
    """One client connection, as uvicorn's `HttpToolsProtocol` with the module's bounds."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        bounds: Bounds | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if isinstance(self.app, ProxyHeadersMiddleware):
            # uvicorn's own, on unless `--no-proxy-headers`: it would believe any X-Forwarded-For from 127.0.0.1 and
            # hand it to the app as the peer. The app decides itself whom to believe (APIOPS_TRUSTED_PROXIES).
            self.app = self.app.app
        self.bounds = bounds or _process_bounds()
        self.waiting = _waiting.setdefault(server_state, {})
        # Bytes of the coming request head fed to the parser so far; None while a body is read. Bytes that follow a
        # body in the same read go to the parser unbounded: at most one read (256 KiB) more.
        self.head_bytes: int | None = 0
        self.head_begun = False
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()
        if len(self.connections) > self.bounds.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_read()
        self.waiting.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # While a head is being read, the parser is fed no more than its limit allows: llhttp would buffer it all.
        while data and self.head_bytes is not None:
            room = self.bounds.max_header_bytes - self.head_bytes
            if room <= 0:
                limit = self.bounds.max_header_bytes
                logger.warning("refused a request head over %d bytes from %s", limit, self._client())
                message = f"the request line and headers exceed {limit} bytes (APIOPS_MAX_HEADER_BYTES)"
                self._refuse(431, "headers_too_large", message, linger=True)
                return
            piece, data = data[:room], data[room:]
            self.head_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return
        if data:
            super().data_received(data)

    # Parser callbacks: a head begins with a message and ends with its headers.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_begun = True
        if self.head_deadline is None:  # a kept-alive connection's next request: its head has a deadline of its own
            self._await_head()

    def on_headers_complete(self) -> None:
        self._head_read()
        self.waiting.pop(self, None)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.head_bytes, self.head_begun = 0, False  # what follows is the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle until the next request, or uvicorn's keep-alive timeout
            self.waiting[self] = None

    def _await_head(self) -> None:
        self.waiting[self] = None
        self.head_deadline = self.loop.call_later(self.bounds.header_timeout_s, self._head_timed_out)

    def _head_read(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None
        self.head_bytes = None

    def _head_timed_out(self) -> None:
        self.head_deadline = None
        if self.transport.is_closing():
            return
        if not self.head_begun:  # nothing sent: a preconnect, a port check, or a slow connection; just close
            self._close()
            return
        logger.info(
            "closed a connection from %s: no complete request head within %gs",
            self._client(),
            self.bounds.header_timeout_s,
        )
        message = (
            f"the request line and headers took longer than {self.bounds.header_timeout_s:g}s (APIOPS_HEADER_TIMEOUT_S)"
        )
        self._refuse(408, "request_timeout", message, linger=False)

    def _make_room(self) -> None:
        oldest = next(iter(self.waiting))
        if oldest is not self:
            oldest._close()
            return
        logger.warning(
            "refused a connection from %s: %d connections, all with a request in flight",
            self._client(),
            len(self.connections) - 1,
        )
        message = f"the server has {self.bounds.max_connections} connections busy (APIOPS_MAX_CONNECTIONS); try again"
        self._refuse(503, "too_many_connections", message, linger=False)

    def _close(self) -> None:
        """Close at once, and no longer count as a connection (the loop reports the loss only later)."""
        self.waiting.pop(self, None)
        self.connections.discard(self)
        self.transport.close()

    def _refuse(self, status: int, code: str, message: str, linger: bool) -> None:
        """Answer `status` in the one JSON error shape and close; with `linger`, only after LINGER_S."""
        self._head_read()
        self.waiting.pop(self, None)
        self.connections.discard(self)
        body = json.dumps(error_body(code, message)).encode()
        head = [STATUS_LINE[status]]
        head += [b"%s: %s\r\n" % pair for pair in self.server_state.default_headers]
        head += [b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)]
        self.transport.write(b"".join(head) + body)
        if not linger or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.transport.pause_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _client(self) -> str:
        return self.client[0] if self.client else "?"
