"""What the processes print, read from the real processes as a log collector or a person at a terminal reads it:
in prod, every line of the API and of a worker is one JSON object (uvicorn's and arq's lines, and an exception
nothing caught, included), naming the request or the job it belongs to; an invalid setting is one line naming its
variable, and exit 2, however the API is started."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.conftest import free_port, headers, key_entries, wait_for, wait_for_status
from tests.processes import worker_env

BIN = Path(sys.executable).parent
API_KEYS = "[" + ",".join(k.model_dump_json() for k in key_entries()) + "]"


def prod_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    return worker_env(settings, env="prod", log_format="json", api_keys=API_KEYS, session_secret="s" * 32, **overrides)


def json_lines(output: bytes, process: str) -> list[dict[str, Any]]:
    """Every line `process` printed, each parsed; fails naming the first that is not a JSON log line."""
    parsed = []
    for line in output.decode().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{process} printed a line that is not JSON: {line!r}") from None
        assert isinstance(entry, dict) and {"time", "level", "logger", "message"} <= set(entry), (process, line)
        parsed.append(entry)
    return parsed


async def _start(command: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(BIN / command[0]), *command[1:], env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def _answers(port: int) -> bool:
    async with httpx.AsyncClient() as probe:
        try:
            return (await probe.get(f"http://127.0.0.1:{port}/livez")).status_code == 200
        except httpx.TransportError:
            return False


@pytest.mark.parametrize("serve", [["apiops", "serve"], ["uvicorn", "--factory", "service.api.app:create_app"]])
async def test_in_prod_every_line_of_the_api_and_a_worker_is_json_naming_its_request_or_job(
    settings: Settings, serve: list[str]
) -> None:
    port = free_port()
    command = [*serve, "--port", str(port)] if serve[0] == "uvicorn" else serve
    api = await _start(command, prod_env(settings, port=port))
    worker = await _start(["arq", "jobs.worker.WorkerSettings"], prod_env(settings))
    try:
        await wait_for(lambda: _answers(port), within=30, interval=0.05)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers("writer")) as client:
            submitted = await client.post("/ops/jobs/noop", json={"steps": 2}, headers={"X-Request-ID": "req-json"})
            job_id = submitted.json()["job_id"]
            await wait_for_status(client, job_id, "success", within=20)
            await client.get("/ops/jobs/no-such-job", headers={"X-Request-ID": "req-missing"})
    finally:
        for process in (api, worker):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            (api_out, api_err), (worker_out, worker_err) = await asyncio.gather(api.communicate(), worker.communicate())

    api_lines = json_lines(api_out + api_err, "apiops serve")
    worker_lines = json_lines(worker_out + worker_err, "the worker")
    assert {"uvicorn.error", "service.access"} <= {line["logger"] for line in api_lines}
    assert any("Started server process" in line["message"] for line in api_lines)
    access = {line["request_id"]: line["message"] for line in api_lines if line["logger"] == "service.access"}
    assert access["req-json"].startswith("POST /ops/jobs/noop 202")
    assert access["req-missing"].startswith("GET /ops/jobs/no-such-job 404")
    assert any(line["message"].startswith("Starting worker") for line in worker_lines)  # arq's, before start-up
    about_the_job = [line for line in worker_lines if job_id in line["message"]]
    assert {line["logger"] for line in about_the_job} >= {"arq.worker", "jobs.runtime.engine"}
    assert all(line.get("job_id") == job_id for line in about_the_job), about_the_job


async def _run_on_a_taken_port(command: list[str], setting: str, settings: Settings) -> list[dict[str, Any]]:
    """`command`'s JSON lines when the port `setting` names is already taken: it must fail."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = await _start(command, prod_env(settings, **{setting: taken.getsockname()[1]}))
        async with asyncio.timeout(30):
            out, err = await process.communicate()
    assert process.returncode != 0
    return json_lines(out + err, " ".join(command))


async def test_an_exception_nothing_caught_is_one_json_line_with_its_traceback(settings: Settings) -> None:
    """A worker whose metrics port is taken cannot start: it says why as a JSON line, not a bare traceback."""
    lines = await _run_on_a_taken_port(["arq", "jobs.worker.WorkerSettings"], "worker_metrics_port", settings)

    uncaught = [line for line in lines if line["message"].startswith("uncaught exception")]
    assert len(uncaught) == 1 and "address already in use" in uncaught[0]["exception"].lower(), lines


async def test_uvicorns_own_error_is_a_json_line_too(settings: Settings) -> None:
    lines = await _run_on_a_taken_port(["apiops", "serve"], "port", settings)

    assert any(line["logger"] == "uvicorn.error" and line["level"] == "ERROR" for line in lines), lines


@pytest.mark.parametrize(
    "command",
    [
        ["apiops", "serve"],
        ["apiops", "run"],
        ["uvicorn", "service.api.app:create_app", "--factory", "--port", "0"],
    ],
    ids=["apiops-serve", "apiops-run", "uvicorn"],
)
async def test_an_invalid_job_type_setting_is_one_line_and_exit_2_however_the_api_is_started(
    settings: Settings, command: list[str]
) -> None:
    env = worker_env(settings, port=free_port(), kube_request_timeout_s="abc")
    process = await _start(command, env)
    async with asyncio.timeout(30):
        out, err = await process.communicate()

    printed = (out + err).decode()
    assert process.returncode == 2, printed
    assert "Traceback" not in printed
    said = [line for line in printed.splitlines() if "APIOPS_KUBE_REQUEST_TIMEOUT_S" in line]
    assert said, printed
    for line in said:  # one per process that read it: `apiops run`'s API and worker both may
        assert line.endswith(
            "invalid setting of job types pg-rebuild, pg-switchover, pg-restart, pg-reinit: "
            "APIOPS_KUBE_REQUEST_TIMEOUT_S='abc': Input should be a valid number, unable to parse string as a number; "
            "set it right or unset it (default: 10.0)"
        ), line
