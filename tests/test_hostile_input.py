"""Input a hostile or careless client sends: each gets a 4xx that says what is wrong, and nothing is written.

Nothing here may reach the JSON parser's recursion limit or PostgreSQL's refusal of NUL and lone surrogates,
both of which used to end in a reset connection or a 500."""

from __future__ import annotations

import base64
import json

import asyncpg
import httpx
import pytest

from tests.conftest import submit


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


async def _jobs(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM ops_job"))


@pytest.mark.parametrize("depth", [33, 5000])
async def test_json_nested_too_deep_is_a_400_that_says_so(
    client: httpx.AsyncClient, db: asyncpg.Connection, depth: int
) -> None:
    body = '{"target": ' + "[" * depth + "]" * depth + "}"
    response = await client.post("/ops/jobs/noop", content=body, headers={"Content-Type": "application/json"})
    assert "deeper than 32 levels" in _error(response, 400, "malformed_json")
    assert await _jobs(db) == 0


async def test_brackets_inside_strings_do_not_count_as_nesting(client: httpx.AsyncClient) -> None:
    await submit(client, target="[[[[" * 20 + '"{{{' * 20)


async def test_a_number_of_too_many_digits_is_a_400(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    body = '{"steps": ' + "9" * 5000 + "}"
    response = await client.post("/ops/jobs/noop", content=body, headers={"Content-Type": "application/json"})
    assert "more digits" in _error(response, 400, "malformed_json")
    assert await _jobs(db) == 0


@pytest.mark.parametrize("text", ["pg\\u0000x", "pg\\ud800x"], ids=["nul", "lone-surrogate"])
async def test_text_postgresql_cannot_store_is_a_422_naming_the_field(
    client: httpx.AsyncClient, db: asyncpg.Connection, text: str
) -> None:
    body = '{"target": "' + text + '"}'
    response = await client.post("/ops/jobs/noop", content=body, headers={"Content-Type": "application/json"})
    message = _error(response, 422, "invalid_params")
    assert message.startswith("invalid params: target: holds a NUL character or a lone UTF-16 surrogate")
    assert response.json()["error"]["details"] == [
        {"field": "target", "message": "holds a NUL character or a lone UTF-16 surrogate, which cannot be stored"}
    ]
    assert await _jobs(db) == 0


@pytest.mark.parametrize(
    "url",
    ["/ops/jobs/noop-%00", "/ops/jobs/noop-x%00/cancel", "/ops/jobs?actor=a%00b", "/ops/jobs/noop-x/events?after=%00"],
)
async def test_a_nul_in_the_url_is_a_400_before_any_route(client: httpx.AsyncClient, url: str) -> None:
    method = "POST" if url.endswith("/cancel") else "GET"
    assert "NUL character" in _error(await client.request(method, url), 400, "bad_request")


async def test_a_cursor_holding_a_nul_is_an_invalid_cursor(client: httpx.AsyncClient) -> None:
    forged = base64.urlsafe_b64encode(json.dumps(["2026-12-01T00:00:00+00:00", "noop-\u0000"]).encode()).decode()
    response = await client.get("/ops/jobs", params={"cursor": forged})
    assert "invalid cursor" in _error(response, 422, "invalid_params")


@pytest.mark.parametrize("after", ["²", "99999999999999999999", "-1", "1e3"])
async def test_a_resume_point_that_is_no_event_id_is_a_422(client: httpx.AsyncClient, after: str) -> None:
    job_id = await submit(client)
    responses = [await client.get(f"/ops/jobs/{job_id}/events", params={"after": after})]
    if after.isascii():  # a header value is ASCII on the wire
        responses.append(await client.get(f"/ops/jobs/{job_id}/events", headers={"Last-Event-ID": after}))
    for response in responses:
        assert "must be an event id" in _error(response, 422, "invalid_params")
