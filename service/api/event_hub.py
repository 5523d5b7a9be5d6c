"""Live job events for the API's streams: one LISTEN connection per API process, fanned out to the watchers.

PostgreSQL announces every new `ops_job_event` row on a channel (a trigger, migration 0003) with its job id and
event id. The hub keeps one connection listening; for the jobs somebody is watching it reads the new rows, in
batches and in order, and hands them to each watcher's queue. No watcher polls the database. If the listening
connection drops, every watcher is told to re-read what it may have missed once the hub is listening again.

A list-level watcher (`watch_all`) gets every event of every job, with its job (`service.api.listing.ListedEvent`),
and filters what it passes on: the console's pages and `GET /ops/events`.

Other parts of the process may listen on the same connection (`also_listen`: the key store hears revocations).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.listing import ListedEvent, events_by_id
from service.api.schemas import EventOut
from service.backoff import Backoff
from service.db import asyncpg_dsn
from service.logs import detached
from service.settings import Settings

logger = logging.getLogger(__name__)

CHANNEL = "apiops_job_events"
RECONNECT = Backoff(initial_s=0.2, cap_s=5.0)


@dataclass(frozen=True)
class Message:
    """One event, rendered once as its Server-Sent-Events message, whatever the number of watchers."""

    event_id: int
    kind: str
    text: str

    @classmethod
    def of(cls, event: EventOut) -> Message:
        text = f"id: {event.event_id}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n"
        return cls(event.event_id, event.kind, text)


class Closing:
    """Put in every watcher's queue when the API process begins to stop: end the stream now, so that the server's
    graceful stop need not wait for it; the client resumes elsewhere with `Last-Event-ID`."""


CLOSING = Closing()


@dataclass(frozen=True)
class Listed:
    """One event for the list-level watchers: with its job, to filter on, and rendered once as its SSE message (the
    event with its job's id, type, target and status)."""

    event: ListedEvent
    text: str

    @classmethod
    def of(cls, listed: ListedEvent) -> Listed:
        return cls(listed, f"id: {listed.event.event_id}\nevent: {listed.event.kind}\ndata: {listed.data()}\n\n")


# A watcher's queue carries messages; None: "you may have missed some; read the history after your last id";
# or CLOSING.
Item = Message | Closing | None
ListItem = Listed | Closing | None


class EventHub:
    def __init__(self, settings: Settings, db: AsyncEngine) -> None:
        """`db`: the engine in autocommit (`service.db.autocommit`), to read announced events."""
        self._dsn = asyncpg_dsn(settings.database_url.get_secret_value())
        self._connect_timeout = settings.db_connect_timeout_s
        self._db = db
        self._watchers: dict[str, set[asyncio.Queue[Item]]] = {}
        self._all: set[asyncio.Queue[ListItem]] = set()
        self._announced: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self._running: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        self.closing = False
        # channel -> (called with each payload, called with True once listening and False once no longer)
        self._channels: dict[str, tuple[Callable[[str], None], Callable[[bool], None]]] = {}

    def also_listen(self, channel: str, on_notify: Callable[[str], None], hearing: Callable[[bool], None]) -> None:
        """Listen on `channel` too, from `start()` on: `on_notify(payload)` for each announcement; `hearing(True)`
        each time announcements are heard from then on, `hearing(False)` when they may be missed (the connection
        was lost)."""
        self._channels[channel] = (on_notify, hearing)

    def start(self) -> None:
        """Listen from now on (the first watcher starts it otherwise); idempotent."""
        if self._running is None:
            # Outside whichever request starts it: the listener serves every stream, its lines name none of them.
            self._running = asyncio.create_task(self.run(), name="apiops-listen", context=detached())

    async def close(self) -> None:
        if self._running is not None:
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)

    @asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Queue[Item]]:
        """A queue of the job's new events, from now on. Subscribe before reading the history: nothing is lost."""
        # Listen from the first watcher on, unless started already. Events committed before the listening starts are
        # caught up by the resync that follows it.
        self.start()
        queue: asyncio.Queue[Item] = asyncio.Queue()
        if self.closing:
            queue.put_nowait(CLOSING)
        self._watchers.setdefault(job_id, set()).add(queue)
        try:
            yield queue
        finally:
            watchers = self._watchers.get(job_id, set())
            watchers.discard(queue)
            if not watchers:
                self._watchers.pop(job_id, None)

    @asynccontextmanager
    async def watch_all(self) -> AsyncIterator[asyncio.Queue[ListItem]]:
        """A queue of every job's new events, from now on (the caller filters them)."""
        self.start()
        queue: asyncio.Queue[ListItem] = asyncio.Queue()
        if self.closing:
            queue.put_nowait(CLOSING)
        self._all.add(queue)
        try:
            yield queue
        finally:
            self._all.discard(queue)

    def _queues(self) -> list[asyncio.Queue[Item] | asyncio.Queue[ListItem]]:
        return [*(queue for queues in self._watchers.values() for queue in queues), *self._all]

    def end_streams(self) -> None:
        """Tell every stream, now and from now on, to end: the process is stopping."""
        self.closing = True
        for queue in self._queues():
            queue.put_nowait(CLOSING)

    async def run(self) -> None:
        """Listen (reconnecting with backoff) and fan out, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._fan_out())
            await self._listen()

    async def _listen(self) -> None:
        retries = RECONNECT.retries()
        while True:
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._connect_timeout,
                    server_settings={"application_name": "apiops-api-listen"},
                )
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                delay = retries.failed()
                logger.warning("live events: cannot listen (retrying in %.1fs): %s", delay, exc)
                await asyncio.sleep(delay)
                continue
            retries.succeeded()
            try:
                await self._listen_on(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Lost before its termination listener was in place (while it was still starting to listen).
                logger.warning("live events: listening connection lost (%s); reconnecting", exc)
            finally:
                self.listening.clear()
                for _, hearing in self._channels.values():
                    hearing(False)
                if not conn.is_closed():
                    await conn.close(timeout=1)

    async def _listen_on(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(CHANNEL, self._on_notify)
        for channel, (on_notify, hearing) in self._channels.items():
            await conn.add_listener(channel, lambda _c, _pid, _ch, payload, tell=on_notify: tell(str(payload)))
            hearing(True)
        self.listening.set()
        self._resync_everyone()  # whatever was announced while nobody listened
        await lost.wait()
        logger.warning("live events: listening connection lost; reconnecting")

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        job_id, _, event_id = str(payload).rpartition(" ")
        if self._all or job_id in self._watchers:
            self._announced.put_nowait((job_id, int(event_id)))

    async def _fan_out(self) -> None:
        while True:
            batch = [await self._announced.get()]
            while not self._announced.empty():
                batch.append(self._announced.get_nowait())
            ids = [event_id for job_id, event_id in batch if self._all or job_id in self._watchers]
            if not ids:
                continue
            try:
                async with self._db.connect() as conn:
                    events = await events_by_id(conn, ids)
            except Exception as exc:  # the database is down: the watchers re-read once it answers
                logger.warning("live events: cannot read announced events: %s", exc)
                self._resync_everyone()
                continue
            for listed in events:
                if listed.job_id in self._watchers:
                    message = Message.of(listed.event)
                    for queue in self._watchers[listed.job_id]:
                        queue.put_nowait(message)
                if self._all:
                    everyone = Listed.of(listed)
                    for all_queue in self._all:
                        all_queue.put_nowait(everyone)

    def _resync_everyone(self) -> None:
        for queue in self._queues():
            queue.put_nowait(None)
