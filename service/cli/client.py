"""`ApiClient`: the ApiOps HTTP API as async methods, for the `apiops` command (and any Python caller).

Every error response becomes one `ApiError(status, code, message)`; a server that cannot be reached becomes
`Unreachable`, naming the URL. `events` reads one connection of a job's Server-Sent Events stream; `follow`
reconnects with `Last-Event-ID` until the job's `finished` event, saying while it waits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from service.backoff import Backoff

REQUEST_TIMEOUT_S = 10.0
# The server sends a keep-alive at least every 15 s: two missed ones mean the connection is dead.
STREAM_READ_TIMEOUT_S = 35.0
# How `follow` reconnects, and for how long without getting through before it gives up.
RECONNECT = Backoff(initial_s=0.2, cap_s=5.0, give_up_after_s=60.0)


class ApiError(Exception):
    """An error response of the API: its status and its `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class Unreachable(Exception):
    """No HTTP answer at all: refused, timed out, cut off."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's history, as `?include=events` and the event stream carry it."""

    event_id: int
    kind: str
    step: str | None
    status: str | None
    detail: str | None
    attempt: int | None
    actor: str | None
    created_at: datetime

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobEvent:
        return cls(
            event_id=int(data["event_id"]),
            kind=str(data["kind"]),
            step=data.get("step"),
            status=data.get("status"),
            detail=data.get("detail"),
            attempt=data.get("attempt"),
            actor=data.get("actor"),
            created_at=datetime.fromisoformat(data["created_at"]),
        )


class ApiClient:
    def __init__(self, base_url: str, api_key: str | None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"User-Agent": "apiops-cli"}
        if api_key:
            headers["X-API-Key"] = api_key
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=REQUEST_TIMEOUT_S, transport=transport
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def submit(self, job_type: str, params: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return await self._call("POST", f"/ops/jobs/{_segment(job_type)}", json=params, headers=headers)

    async def get(self, job_id: str, include_events: bool = False) -> dict[str, Any]:
        params = {"include": "events"} if include_events else {}
        return await self._call("GET", f"/ops/jobs/{_segment(job_id)}", params=params)

    async def list(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        actor: str | None = None,
        target: str | None = None,
        since: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        query = {
            "status": status, "type": type, "actor": actor, "target": target, "since": since, "limit": limit,
            "cursor": cursor,
        }  # fmt: skip
        return await self._call("GET", "/ops/jobs", params={k: v for k, v in query.items() if v is not None})

    async def job_types(self) -> dict[str, Any]:
        return await self._call("GET", "/ops/job-types")

    async def create_key(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", "/ops/keys", json=body)

    async def keys(self) -> dict[str, Any]:
        return await self._call("GET", "/ops/keys")

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/ops/keys/{_segment(key_id)}")

    async def approve(self, job_id: str, reason: str | None = None) -> dict[str, Any]:
        body = {"reason": reason} if reason else {}
        return await self._call("POST", f"/ops/jobs/{_segment(job_id)}/approve", json=body)

    async def reject(self, job_id: str, reason: str) -> dict[str, Any]:
        return await self._call("POST", f"/ops/jobs/{_segment(job_id)}/reject", json={"reason": reason})

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/ops/jobs/{_segment(job_id)}/cancel")

    async def retry(self, job_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/ops/jobs/{_segment(job_id)}/retry")

    async def events(
        self, job_id: str, last_event_id: int | None = None, on_open: Callable[[], None] | None = None
    ) -> AsyncGenerator[JobEvent, None]:
        """One connection of `GET /ops/jobs/{id}/events`: the events after `last_event_id`, until the server
        ends the stream; `on_open` is called once the server has accepted it. A connection that drops raises
        `Unreachable`."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=STREAM_READ_TIMEOUT_S)
        url = f"/ops/jobs/{_segment(job_id)}/events"
        try:
            async with self._http.stream("GET", url, headers=headers, timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _api_error(response)
                if on_open is not None:
                    on_open()
                async for data in _sse_data(response.aiter_lines()):
                    yield JobEvent.from_json(json.loads(data))
        except httpx.TransportError as exc:
            raise Unreachable(self.base_url, _reason(exc)) from None

    async def follow(
        self, job_id: str, last_event_id: int | None = None, notice: Callable[[str], None] | None = None
    ) -> AsyncGenerator[JobEvent, None]:
        """The events after `last_event_id` up to and including the first `finished`, across reconnects.

        A dropped connection (or a 5xx from a restarting server, or a stream the server ended before the job's
        end, as a replica that stops does) is retried with backoff (RECONNECT), resuming after the last event seen,
        until it has failed for too long without getting through; other API errors end it at once. Behind a load
        balancer the new connection reaches another replica. `notice` is told, in words, each time the stream is
        lost and when it is back, so that a person watching knows the wait is not the job's."""
        say = notice or (lambda message: None)
        retries = RECONNECT.retries()
        lost = False

        def opened() -> None:
            nonlocal lost
            if lost:
                say(f"event stream back; resuming after event {last_event_id}")
                lost = False

        while True:
            try:
                async with aclosing(self.events(job_id, last_event_id, on_open=opened)) as events:
                    async for event in events:
                        retries.succeeded()
                        last_event_id = event.event_id
                        yield event
                        if event.kind == "finished":
                            return
                # The server ended the stream before the job's end (it is stopping, say): resume. An answer does
                # not end the follow, but one that carried no event still backs off.
                reason = "the server ended it"
                delay = retries.failed()
            except (Unreachable, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status < 500:
                    raise
                reason = str(exc)
                delay = retries.failed()
                if retries.exhausted:
                    raise
            lost = True
            say(f"event stream lost ({reason}); reconnecting in {delay:.1f}s")
            await asyncio.sleep(delay)

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(self.base_url, _reason(exc)) from None
        if response.status_code >= 400:
            raise _api_error(response)
        try:
            body = response.json()
        except ValueError:
            raise ApiError(response.status_code, "bad_response", "the answer is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(response.status_code, "bad_response", "the answer is not a JSON object")
        return body


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each message of a text/event-stream; comments (keep-alives) and other fields are skipped:
    the JSON carries the id and the kind too."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _api_error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        # Not the API's own shape: a proxy or load balancer answered.
        text = " ".join(response.text.split())[:200] or response.reason_phrase
        return ApiError(response.status_code, "http_error", text)


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _segment(value: str) -> str:
    """`value` as one path segment: an id containing `/` or `?` must not reach another route."""
    return quote(value, safe="")
