"""`GET /ops/events`: every event of the jobs a key may see, live, filtered, resumable; over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from service.settings import Settings
from tests.conftest import headers, live_api, running_worker, wait_for_status
from tests.sse import Message, SseReader


@asynccontextmanager
async def all_events(base: str, who: str = "reader", **params: Any) -> AsyncIterator[SseReader]:
    request_headers = {k.replace("_", "-"): v for k, v in params.pop("headers", {}).items()}
    async with (
        httpx.AsyncClient(base_url=base, headers=headers(who), timeout=10) as http,
        http.stream("GET", "/ops/events", params=params, headers=request_headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        yield SseReader(response)


async def _submit(base: str, who: str = "writer", job_type: str = "noop", **params: Any) -> str:
    async with httpx.AsyncClient(base_url=base, headers=headers(who)) as http:
        response = await http.post(f"/ops/jobs/{job_type}", json=params)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["job_id"]
        return job_id


async def _until(sse: SseReader, done: Any) -> list[Message]:
    """Messages (comments left out) until one for which `done(message)` holds, that one included."""
    messages = []
    while True:
        message = await asyncio.wait_for(sse.next(), 15)
        assert message is not None, "the stream ended"
        if message.data is None:
            continue
        messages.append(message)
        if done(message):
            return messages


def _finished(job_id: str) -> Any:
    return lambda m: m.data["job_id"] == job_id and m.event == "finished"


async def test_a_key_sees_every_event_of_its_teams_jobs_and_none_of_another_teams(settings: Settings) -> None:
    async with live_api(settings) as base, all_events(base) as sse:
        blue = await _submit(base, "blue-writer", steps=1)
        ours = await _submit(base, steps=2)
        async with running_worker(settings):
            first = await _until(sse, _finished(ours))
            # Once the other team's job is done too, one more of ours: had the stream carried the other team's
            # events, they would have come before this one's.
            async with httpx.AsyncClient(base_url=base, headers=headers("blue-writer")) as http:
                await wait_for_status(http, blue, "success", within=15)
            later = await _submit(base, steps=1)
            second = await _until(sse, _finished(later))

    seen = first + second
    assert {m.data["job_id"] for m in seen if m.data} == {ours, later}
    kinds = [m.event for m in first if m.data and m.data["job_id"] == ours]
    assert kinds[0] == "created" and kinds[-1] == "finished" and "claimed" in kinds
    last = first[-1].data or {}
    assert last["job_type"] == "noop" and last["job_status"] == "success" and last["event_id"] == first[-1].id


async def test_the_service_admin_sees_every_team_and_filters_combine(settings: Settings) -> None:
    async with live_api(settings) as base, all_events(base, "operator", kind="finished", type="noop") as sse:
        blue = await _submit(base, "blue-writer", steps=1)
        ours = await _submit(base, steps=1)
        async with running_worker(settings):
            messages = await _until(sse, lambda m: True)
            messages += await _until(sse, lambda m: True)

    assert sorted(m.data["job_id"] for m in messages if m.data) == sorted([blue, ours])
    assert {m.event for m in messages} == {"finished"}


async def test_reconnecting_with_last_event_id_resumes_without_a_gap(settings: Settings) -> None:
    async with live_api(settings) as base:
        async with all_events(base) as sse:
            job_id = await _submit(base, steps=3, sleep_s=0.1)
            before = await _until(sse, lambda m: m.event == "created")
        async with running_worker(settings):
            async with httpx.AsyncClient(base_url=base, headers=headers("reader")) as http:
                await wait_for_status(http, job_id, "success", within=15)
                history = (await http.get(f"/ops/jobs/{job_id}", params={"include": "events"})).json()["events"]
        # Everything after the `created` event happened while nobody watched.
        async with live_api(settings) as other, all_events(other, headers={"Last_Event_ID": str(before[-1].id)}) as sse:
            resumed = await _until(sse, _finished(job_id))

    assert [m.id for m in before + resumed] == [event["event_id"] for event in history]


async def test_bad_filters_and_another_teams_filter(settings: Settings) -> None:
    async with live_api(settings) as base, httpx.AsyncClient(base_url=base, headers=headers("reader")) as http:
        for params, field in [
            ({"kind": "exploded"}, "kind"),
            ({"status": "done"}, "status"),
            ({"colour": "red"}, "colour"),
        ]:
            response = await http.get("/ops/events", params=params)
            assert response.status_code == 422, params
            assert [d["field"] for d in response.json()["error"]["details"]] == [field]
        response = await http.get("/ops/events", headers={"Last-Event-ID": "x"})
        assert response.status_code == 422
        anonymous = await http.get("/ops/events", headers={"X-API-Key": ""})
        assert anonymous.status_code == 401
