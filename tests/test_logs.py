"""Log lines: JSON on request, with the context of the request or job that wrote them, and never a secret."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from typing import Any

import asyncpg
import httpx
import pytest

from service.logs import configure_logging
from service.settings import Settings
from tests.conftest import KEYS, api_client, headers, live_api, running_worker, wait_for, wait_for_status


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
    for line in job_lines:  # the engine's lines say more; arq's (its start and end of each delivery) name the job
        if line["logger"].startswith("jobs."):
            assert line["type"] == "noop" and line["attempt"] == 1
    assert {line["logger"] for line in job_lines} >= {"arq.worker", "jobs.runtime.engine"}
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


def _json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


async def test_concurrent_requests_and_jobs_never_borrow_each_others_context(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    json_settings = settings.model_copy(update={"log_format": "json"})
    async with api_client(json_settings, headers=headers("writer")) as client:
        submitted = await asyncio.gather(*(client.post("/ops/jobs/noop", json={"steps": 3}) for _ in range(8)))
        job_ids = [response.json()["job_id"] for response in submitted]
        async with running_worker(json_settings):
            # Each job read by a request of its own, all at once, while the worker runs them all at once.
            reads = [
                client.get(f"/ops/jobs/{job_id}", headers={"X-Request-ID": f"read-{job_id}"}) for job_id in job_ids
            ]
            await asyncio.gather(*reads)
            await asyncio.gather(*(wait_for_status(client, job_id, "success") for job_id in job_ids))

    lines = _json_lines(capsys.readouterr().err)
    reads_seen = [line for line in lines if str(line.get("request_id", "")).startswith("read-")]
    assert len(reads_seen) == len(job_ids)
    for line in reads_seen:  # the access line of the request that read job X is the one with request id read-X
        assert line["message"].startswith(f"GET /ops/jobs/{line['request_id'].removeprefix('read-')} 200"), line
    mentioning = [(line, [j for j in job_ids if j in line["message"]]) for line in lines if "request_id" not in line]
    worker_lines = [(line, named) for line, named in mentioning if named]
    assert len(worker_lines) >= 3 * len(job_ids)  # claimed, arq's start and end, the outcome: per job
    for line, named in worker_lines:
        assert named == [line.get("job_id")], line
    assert not [line for line in lines if "request_id" in line and "job_id" in line]


async def test_the_live_events_listener_names_no_request_though_one_started_it(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    json_settings = settings.model_copy(update={"log_format": "json"})
    said: list[dict[str, Any]] = []

    async def lost_said() -> bool:
        said.extend(_json_lines(capsys.readouterr().err))
        return any("listening connection lost" in line["message"] for line in said)

    async def listening() -> bool:
        return bool(await db.fetchval(_LISTENER + " LIMIT 1"))

    async with live_api(json_settings) as base, httpx.AsyncClient(base_url=base, headers=headers("writer")) as client:
        job_id = (await client.post("/ops/jobs/noop", json={"steps": 1})).json()["job_id"]  # no worker: pending
        events = client.stream("GET", f"/ops/jobs/{job_id}/events", headers={"X-Request-ID": "watcher"})
        async with events as stream:
            assert (await anext(stream.aiter_lines())).startswith("id: ")
            await wait_for(listening)
            await db.execute(f"SELECT pg_terminate_backend(pid) FROM ({_LISTENER}) AS listener")
            await wait_for(lost_said)

    lost = [line for line in said if "listening connection lost" in line["message"]]
    assert lost and all("request_id" not in line for line in lost), lost


_LISTENER = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = 'apiops-api-listen' AND datname = current_database()"
)


async def test_control_characters_in_a_path_are_escaped_in_the_text_format(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = "2026-01-01 00:00:00,000 INFO    service.access: forged"
    async with api_client(settings.model_copy(update={"log_format": "text"}), headers=headers("writer")) as client:
        # A line break and a fake log line after it, an ANSI escape, DEL, and NEL (a C1 control some readers break at).
        await client.get(f"/ops/jobs/x%0a{forged}%1b[31m%7f%c2%85end")

    lines = capsys.readouterr().err.splitlines()
    access = [line for line in lines if "service.access" in line]
    assert len(access) == 1, lines
    assert f"GET /ops/jobs/x\\n{forged}\\x1b[31m\\x7f\\x85end 404" in access[0]
    assert not any(char in access[0] for char in "\x1b\x7f\x85")


def test_python_warnings_are_log_lines_in_the_configured_format() -> None:
    """In a process of its own: pytest records warnings itself, in place of the handler a process installs."""
    script = (
        "import warnings; from service.logs import configure_logging; from service.settings import Settings; "
        "configure_logging(Settings(log_format='json')); warnings.warn('this knob is going away', UserWarning)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)

    lines = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [("py.warnings", "WARNING")], lines
    assert "this knob is going away" in lines[0]["message"]
