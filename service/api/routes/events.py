"""Live events as Server-Sent Events: `GET /ops/jobs/{job_id}/events`, a job's history then its changes as they
happen; `GET /ops/events`, every event of the jobs the caller may see, filtered as the job list is.

Each message carries the event id, so a client that reconnects with `Last-Event-ID` resumes without a gap. A job's
stream ends once the job has finished (for a finished job, right after its history); the list-level stream only
when the process stops.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from service.api.auth import require
from service.api.event_hub import CLOSING, Listed, Message
from service.api.listing import ListedEvent, ListFilter, Statuses, comma_list, events_after
from service.api.repository import get_events, get_job
from service.api.request_body import query_of, validate
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
    # Watch first, then read the history: an event committed in between arrives both ways and is sent once.
    async with state.hub.watch(job_id) as live:
        last = after
        finished, history = await _history(state, job_id, last)
        for message in history:
            yield message.text
            last = message.event_id
        if finished:
            return
        async for items in _batches(live, state.settings.sse_keepalive_s):
            if not items:
                yield KEEPALIVE
                continue
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


KEEPALIVE = ": keep-alive\n\n"
T = TypeVar("T")


async def _batches(live: asyncio.Queue[T], keepalive_s: float, gather_s: float = 0.0) -> AsyncIterator[list[T]]:
    """What arrives on `live`, a burst at a time (what is already queued goes out in one write); an empty batch when
    nothing came for `keepalive_s`, so that the stream sends a comment and proxies keep it open. With `gather_s`,
    what arrives within that long of a batch's first item goes out with it: fewer, larger writes."""
    while True:
        try:
            # Not wait_for: that wraps every wait in a task of its own, for each watcher at each event.
            async with asyncio.timeout(keepalive_s):
                item = await live.get()
        except TimeoutError:
            yield []
            continue
        if gather_s:
            await asyncio.sleep(gather_s)
        items = [item]
        while not live.empty():
            items.append(live.get_nowait())
        yield items


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


class EventsQuery(BaseModel):
    """`GET /ops/events`: which jobs' events (as `GET /ops/jobs` filters them, at each event) and which kinds."""

    model_config = ConfigDict(extra="forbid")

    type: str | None = None
    status: Statuses | None = None
    actor: str | None = None
    target: str | None = None
    team: str | None = None
    kind: Annotated[tuple[EventKind, ...], BeforeValidator(comma_list)] | None = None
    after: str | None = None  # read by _resume_point


# A resuming list-level stream reads what it missed this many events at a time.
CATCH_UP_BATCH = 500
# A list-level stream carries every job's events to each open page: it sends them at most this often, a burst per
# write. A busy service's events then cost each stream a few writes a second, not one per event (measured with
# `python -m tests.bench.watchers --consoles 100`); a page is at most this much later.
LIST_GATHER_S = 0.2


async def all_events(request: Request) -> StreamingResponse:
    """Every event of the jobs the caller may see, live, filtered; from `Last-Event-ID` on when given (else from
    now on)."""
    state = AppState.of(request)
    principal = await require(request, Scope.READ)
    query = validate(EventsQuery, query_of(request, repeatable=("status", "kind")))
    after = _resume_point(request)
    filters = principal.confine(ListFilter.within(query))
    return StreamingResponse(
        _ListStream(state, filters, frozenset(query.kind or EventKind), after).run(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _ListStream:
    """One list-level stream. `filters` None: another team's jobs were asked for; as for a list, there are none
    (the stream stays open).

    Events of different jobs are committed by different writers, so they may arrive out of id order; the stream
    sends each as it comes and, after a resume or a gap, re-reads from the last id it sent: at least once, never a
    gap."""

    def __init__(self, state: AppState, filters: ListFilter | None, kinds: frozenset[str], after: int) -> None:
        self._state = state
        self._filters = filters
        self._kinds = kinds
        self._last = after
        self._caught_up: set[int] = set()  # what the last catch-up read, which may arrive live as well

    def _wanted(self, listed: ListedEvent) -> bool:
        return self._filters is not None and listed.event.kind in self._kinds and listed.matches(self._filters)

    def _fresh(self, listed: ListedEvent) -> bool:
        """Wanted, and not sent already by the last catch-up."""
        return self._wanted(listed) and listed.event_id not in self._caught_up

    async def run(self) -> AsyncIterator[str]:
        async with self._state.hub.watch_all() as live:
            if self._last > 0:
                async for text in self._catch_up():
                    yield text
            async for items in _batches(live, self._state.settings.sse_keepalive_s, LIST_GATHER_S):
                if None in items:  # the hub may have missed announcements
                    async for text in self._catch_up():
                        yield text
                fresh = [item for item in items if isinstance(item, Listed) and self._fresh(item.event)]
                self._last = max([self._last, *(item.event.event_id for item in fresh)])
                if fresh:
                    yield "".join(item.text for item in fresh)
                elif not items:
                    yield KEEPALIVE
                if CLOSING in items:
                    return

    async def _catch_up(self) -> AsyncIterator[str]:
        self._caught_up.clear()
        async for batch in _missed(self._state, self._filters, self._last):
            self._caught_up.update(listed.event_id for listed in batch)
            self._last = max(self._last, batch[-1].event_id)
            text = "".join(Listed.of(listed).text for listed in batch if self._wanted(listed))
            if text:
                yield text


async def _missed(state: AppState, filters: ListFilter | None, after: int) -> AsyncIterator[list[ListedEvent]]:
    """The events after `after` of the jobs that pass `filters`, a batch at a time, in id order."""
    while filters is not None:
        async with state.autocommit.connect() as conn:
            batch = await events_after(conn, after, filters, CATCH_UP_BATCH)
        if batch:
            yield batch
        if len(batch) < CATCH_UP_BATCH:
            return
        after = batch[-1].event_id


routes = [
    Route("/ops/events", all_events, methods=["GET"]),
    Route("/ops/jobs/{job_id}/events", job_events, methods=["GET"]),
]
