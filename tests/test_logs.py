"""Log lines: JSON on request, with the context of the request or job that wrote them, and never a secret."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from service.logs import configure_logging
from service.settings import Settings
from tests.conftest import KEYS, api_client, headers, running_worker, wait_for_status


async def test_json_lines_carry_request_and_job_context_and_no_secrets(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    json_settings = settings.model_copy(update={"log_format": "json"})
    async with api_client(json_settings, headers=headers("writer")) as client:
        submitted = await client.post("/ops/jobs/noop", json={"steps": 2}, headers={"X-Request-ID": "req-123"})
        job_id = submitted.json()["job_id"]
        async with running_worker(json_settings):
            await wait_for_status(client, job_id, "success")
        await client.get("/ops/jobs", headers={"X-API-Key": "not-a-real-key"})

    output = capsys.readouterr().err
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert submitted.headers["x-request-id"] == "req-123"
    access = [line for line in lines if line["logger"] == "service.access"]
    assert any(line["request_id"] == "req-123" and "POST /ops/jobs/noop 202" in str(line["message"]) for line in access)
    job_lines = [line for line in lines if line.get("job_id") == job_id]
    assert job_lines, "no log line names the job"
    for line in job_lines:
        assert line["type"] == "noop" and line["attempt"] == 1
    assert {"time", "level", "logger", "message"} <= set(job_lines[0])
    for key, *_ in KEYS.values():
        assert key not in output
    assert "not-a-real-key" not in output and settings.database_url.get_secret_value() not in output


def test_text_is_the_default_in_dev_and_json_in_prod(capsys: pytest.CaptureFixture[str]) -> None:
    dev = Settings()
    prod = Settings(env="prod", api_keys=[{"name": "x", "sha256": "0" * 64, "scopes": ["jobs:read"]}])

    assert (dev.effective_log_format, prod.effective_log_format) == ("text", "json")
    configure_logging(prod)
    logging.getLogger("service.test").info("hello %s", "world")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "hello world" and line["level"] == "INFO"


async def test_every_response_carries_a_request_id(client: httpx.AsyncClient) -> None:
    first = await client.get("/livez")
    second = await client.get("/livez")
    rejected = await client.get("/livez", headers={"X-Request-ID": "bad id with spaces"})

    ids = [r.headers["x-request-id"] for r in (first, second, rejected)]
    assert len(set(ids)) == 3 and "bad id with spaces" not in ids
