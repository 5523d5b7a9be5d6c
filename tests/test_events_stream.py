"""The live event stream (Server-Sent Events) over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import httpx

from service.settings import Settings
from tests.conftest import headers, live_api, running_worker
from tests.sse import SseReader


@asynccontextmanager
async def stream(base: str, job_id: str, **request_headers: str) -> AsyncIterator[SseReader]:
    async with (
        httpx.AsyncClient(base_url=base, headers=headers("reader"), timeout=10) as http,
        http.stream("GET", f"/ops/jobs/{job_id}/events", headers=request_headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseReader(response)


async def _submit(base: str, **params: Any) -> str:
    async with httpx.AsyncClient(base_url=base, headers=headers("writer")) as http:
        response = await http.post("/ops/jobs/noop", json=params)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["job_id"]
        return job_id


async def test_stream_sends_history_then_every_change_live_and_ends_with_the_job(settings: Settings) -> None:
    async with live_api(settings) as base:
        job_id = await _submit(base, steps=2, sleep_s=0.2)
        async with stream(base, job_id) as sse:
            first = await sse.next()
            assert first is not None and first.event == "created"
            async with running_worker(settings):
                rest = await asyncio.wait_for(sse.all(), 10)

    messages = [first, *rest]
    assert [(m.event, (m.data or {}).get("step"), (m.data or {}).get("status")) for m in messages] == [
        ("created", None, "pending"),
        ("claimed", None, "running"),
        ("step", "step-1", "running"),
        ("progress", "step-1", None),
        ("step", "step-1", "success"),
        ("step", "step-2", "running"),
        ("progress", "step-2", None),
        ("step", "step-2", "success"),
        ("finished", None, "success"),
    ]
    ids = [m.id or 0 for m in messages]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(m.data is not None and m.data["event_id"] == m.id for m in messages)


async def test_each_change_reaches_a_watcher_within_200ms(settings: Settings) -> None:
    async with live_api(settings) as base:
        job_id = await _submit(base, steps=5, sleep_s=0.1)
        async with stream(base, job_id) as sse, running_worker(settings):
            messages = await asyncio.wait_for(sse.all(), 15)

    live = [m for m in messages if m.event != "created"]
    delays = [m.received_at - datetime.fromisoformat(m.data["created_at"]).timestamp() for m in live if m.data]
    assert len(delays) >= 15
    # created_at is the writing transaction's start; the commit, the NOTIFY and the delivery all come after it.
    assert max(delays) < 0.2, f"slowest delivery {max(delays) * 1000:.0f} ms"


async def test_each_stream_carries_its_own_jobs_events_exactly_as_its_history(settings: Settings) -> None:
    """Two jobs run side by side: each watcher gets every event of its job, and none of the other's, with the
    same content as the job's stored history."""
    async with live_api(settings) as base:
        job_ids = [await _submit(base, steps=3, sleep_s=0.1) for _ in range(2)]
        async with stream(base, job_ids[0]) as first, stream(base, job_ids[1]) as second, running_worker(settings):
            streamed = await asyncio.wait_for(asyncio.gather(first.all(), second.all()), 10)
        async with httpx.AsyncClient(base_url=base, headers=headers("reader")) as http:
            histories = [
                (await http.get(f"/ops/jobs/{job_id}", params={"include": "events"})).json()["events"]
                for job_id in job_ids
            ]

    for messages, history in zip(streamed, histories, strict=True):
        assert [m.data for m in messages] == history
        assert history[-1]["kind"] == "finished"


async def test_reconnecting_with_last_event_id_resumes_without_gap_or_repeat(settings: Settings) -> None:
    async with live_api(settings) as base:
        job_id = await _submit(base, steps=3, sleep_s=0.2)
        async with running_worker(settings):
            async with stream(base, job_id) as sse:
                seen = [await sse.next() for _ in range(4)]
            last = seen[-1]
            assert last is not None and last.id is not None
            async with stream(base, job_id, **{"Last-Event-ID": str(last.id)}) as sse:
                resumed = await asyncio.wait_for(sse.all(), 10)
        async with stream(base, job_id) as sse:
            everything = await sse.all()

    assert [m.id for m in seen + resumed if m] == [m.id for m in everything]
    assert everything[-1].event == "finished"


async def test_a_finished_jobs_stream_is_its_history(settings: Settings) -> None:
    async with live_api(settings) as base:
        job_id = await _submit(base, steps=1)
        async with running_worker(settings):
            async with stream(base, job_id) as sse:
                await asyncio.wait_for(sse.all(), 10)
            started = time.monotonic()
            async with stream(base, job_id) as sse:
                messages = await sse.all()

    assert time.monotonic() - started < 1
    assert messages[0].event == "created" and messages[-1].event == "finished"


async def test_idle_stream_sends_keep_alive_comments(settings: Settings) -> None:
    quick = settings.model_copy(update={"sse_keepalive_s": 0.2})
    async with live_api(quick) as base:
        job_id = await _submit(base)  # no worker: nothing happens
        async with stream(base, job_id) as sse:
            created = await sse.next()
            keep_alive = await asyncio.wait_for(sse.next(), 2)

    assert created is not None and created.event == "created"
    assert keep_alive is not None and keep_alive.comment == "keep-alive" and keep_alive.event is None


async def test_stream_survives_losing_its_listening_connection(settings: Settings, db: asyncpg.Connection) -> None:
    async with live_api(settings) as base:
        job_id = await _submit(base, steps=4, sleep_s=0.3)
        async with stream(base, job_id) as sse:
            await sse.next()
            await db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'apiops-api-listen' AND datname = current_database()"
            )
            async with running_worker(settings):
                rest = await asyncio.wait_for(sse.all(), 15)

    assert rest[-1].event == "finished"
    assert [m.data["step"] for m in rest if m.event == "step" and m.data and m.data["status"] == "success"] == [
        "step-1",
        "step-2",
        "step-3",
        "step-4",
    ]


async def test_stream_errors_are_plain_json_errors(settings: Settings) -> None:
    async with live_api(settings) as base, httpx.AsyncClient(base_url=base) as http:
        job_id = await _submit(base)
        unknown = await http.get("/ops/jobs/noop-nope/events", headers=headers("reader"))
        anonymous = await http.get(f"/ops/jobs/{job_id}/events")
        bad_resume = await http.get(f"/ops/jobs/{job_id}/events", headers={**headers("reader"), "Last-Event-ID": "x"})

    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")
    assert anonymous.status_code == 401
    assert (bad_resume.status_code, bad_resume.json()["error"]["code"]) == (422, "invalid_params")
