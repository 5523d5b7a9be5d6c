"""Every bad input gets its status code and one JSON error shape, and writes nothing."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from service.settings import Settings

BAD_SUBMISSIONS: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "malformed json",
        {"content": b'{"steps": 3', "headers": {"content-type": "application/json"}},
        400,
        "malformed_json",
    ),
    (
        "not utf-8",
        {"content": b'{"steps": "\xff"}', "headers": {"content-type": "application/json"}},
        400,
        "malformed_json",
    ),
    ("too large", {"json": {"target": "x" * 70_000}}, 413, "payload_too_large"),
    ("form body", {"data": {"steps": "3"}}, 415, "unsupported_media_type"),
    (
        "text body",
        {"content": b'{"steps": 3}', "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    ("array body", {"json": [1, 2]}, 422, "invalid_params"),
    ("steps too many", {"json": {"steps": 21}}, 422, "invalid_params"),
    ("unknown param", {"json": {"steps": 2, "colour": "red"}}, 422, "invalid_params"),
    ("fail after last", {"json": {"steps": 2, "fail_at_step": 3}}, 422, "invalid_params"),
]


@pytest.mark.parametrize(
    ("case", "request_args", "status", "code"), BAD_SUBMISSIONS, ids=[b[0] for b in BAD_SUBMISSIONS]
)
async def test_bad_submission_is_rejected_and_writes_nothing(
    client: httpx.AsyncClient,
    db: asyncpg.Connection,
    redis: Redis,
    settings: Settings,
    case: str,
    request_args: dict[str, Any],
    status: int,
    code: str,
) -> None:
    response = await client.post("/ops/jobs/noop", **request_args)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert await db.fetchval("SELECT count(*) FROM ops_job") == 0
    assert await db.fetchval("SELECT count(*) FROM ops_job_event") == 0
    assert await redis.zcard(settings.queue_name) == 0


async def test_invalid_params_name_each_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/ops/jobs/noop", json={"steps": 0, "sleep_s": -1, "fail_at_step": "x"})

    assert response.status_code == 422
    details = {d["field"]: d["message"] for d in response.json()["error"]["details"]}
    assert details == {
        "steps": "Input should be greater than or equal to 1",
        "sleep_s": "Input should be greater than or equal to 0",
        "fail_at_step": "Input should be a valid integer",
    }


async def test_unknown_job_type_is_404_listing_the_known_ones(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    response = await client.post("/ops/jobs/pg-rebuilt", json={})

    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "unknown_job_type"
    assert "noop" in error["message"]
    assert await db.fetchval("SELECT count(*) FROM ops_job") == 0


async def test_unknown_job_and_unknown_route_are_404(client: httpx.AsyncClient) -> None:
    job = await client.get("/ops/jobs/noop-00000000000000000000000000")
    route = await client.get("/ops/nothing-here")

    assert (job.status_code, job.json()["error"]["code"]) == (404, "not_found")
    assert (route.status_code, route.json()["error"]["code"]) == (404, "not_found")


async def test_wrong_method_is_405_in_the_same_shape(client: httpx.AsyncClient) -> None:
    response = await client.delete("/ops/jobs")

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_a_405_allows_the_methods_of_the_url_it_was_sent_to(client: httpx.AsyncClient) -> None:
    """`/ops/jobs/<type>` and `/ops/jobs/<job_id>` share one route; each URL takes only its own methods, as the
    OpenAPI document lists them."""
    on_type = [await client.request(method, "/ops/jobs/noop") for method in ("GET", "DELETE", "OPTIONS")]
    on_job = await client.request("DELETE", "/ops/jobs/noop-00000000000000000000000000")

    for response in on_type:
        assert (response.status_code, response.headers["allow"]) == (405, "POST"), response.text
        assert response.json()["error"]["code"] == "method_not_allowed"
    assert (on_job.status_code, on_job.headers["allow"]) == (405, "GET, HEAD")
