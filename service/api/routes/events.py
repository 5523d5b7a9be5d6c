"""`GET /ops/jobs/{job_id}/events`: a job's history, then its changes as they happen, as Server-Sent Events.

Each message carries the event id, so a client that reconnects with `Last-Event-ID` resumes without a gap or a
repeat. The stream ends once the job has finished (for a finished job, right after its history).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from service.api.auth import require
from service.api.event_hub import CLOSING, Message
from service.api.repository import get_events, get_job
from service.api.state import AppState
from service.errors import InvalidParams
from service.models import EventKind, JobStatus
from service.settings import Scope


async def job_events(request: Request) -> StreamingResponse:
    state = AppState.of(request)
    principal = await require(request, Scope.READ)
    job_id = request.path_params["job_id"]
    after = _resume_point(request)
    async with state.autocommit.connect() as conn:
        await get_job(conn, job_id, team=principal.team_filter)  # a 404 before the stream starts, as for any read
    return StreamingResponse(
        _stream(state, job_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(state: AppState, job_id: str, after: int) -> AsyncIterator[str]:
    keepalive = state.settings.sse_keepalive_s
    # Watch first, then read the history: an event committed in between arrives both ways and is sent once.
    async with state.hub.watch(job_id) as live:
        last = after
        finished, history = await _history(state, job_id, last)
        for message in history:
            yield message.text
            last = message.event_id
        if finished:
            return
        while True:
            try:
                # Not wait_for: that wraps every wait in a task of its own, for each watcher at each event.
                async with asyncio.timeout(keepalive):
                    item = await live.get()
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            items = [item]
            while not live.empty():  # a burst: what is already queued goes out in one write
                items.append(live.get_nowait())
            if None in items:  # the hub may have missed announcements: catch up from the database
                finished, messages = await _history(state, job_id, last)
            else:
                messages = [m for m in items if isinstance(m, Message)]
                finished = any(m.kind == EventKind.FINISHED for m in messages)
            chunk = []
            for message in messages:
                if message.event_id > last:
                    chunk.append(message.text)
                    last = message.event_id
            if chunk:
                yield "".join(chunk)
            # CLOSING: the process is stopping. What came before it has gone out; the client resumes with
            # Last-Event-ID, on another replica or once this one is back.
            if finished or CLOSING in items:
                return


async def _history(state: AppState, job_id: str, after: int) -> tuple[bool, list[Message]]:
    """Whether the job has finished, and its events after `after`. The status is read first: if it is final, the
    `finished` event was committed before and is in the list."""
    async with state.autocommit.connect() as conn:
        status = JobStatus((await get_job(conn, job_id, team=None)).status)  # the caller's was checked at the start
        return status.finished, [Message.of(event) for event in await get_events(conn, job_id, after)]


EVENT_ID = re.compile(r"[0-9]{1,18}")


def _resume_point(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    # ASCII digits that fit event_id's bigint: `isdigit()` takes "²", and a longer number overflows the query.
    if not EVENT_ID.fullmatch(raw):
        message = "Last-Event-ID (or ?after=) must be an event id this stream sent"
        raise InvalidParams(message, details=[{"field": "Last-Event-ID", "message": message}])
    return int(raw)


routes = [Route("/ops/jobs/{job_id}/events", job_events, methods=["GET"])]
