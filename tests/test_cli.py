"""The `apiops` client commands as an operator runs them: real processes, over real HTTP, against the API served
in the test's event loop and a real worker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.cli.client import ApiClient, ApiError, JobEvent
from service.settings import Settings
from tests.conftest import KEYS, free_port, headers, live_api, running_worker, wait_for_status

APIOPS = str(Path(sys.executable).with_name("apiops"))


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def cli_env(url: str, key: str | None) -> dict[str, str]:
    # The developer's own APIOPS_* settings must not leak into the command under test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIOPS_")}
    env["APIOPS_URL"] = url
    if key is not None:
        env["APIOPS_API_KEY"] = key
    return env


async def start(url: str, *args: str, key: str | None = KEYS["writer"][0]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        APIOPS, *args, env=cli_env(url, key), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def finish(process: asyncio.subprocess.Process, within: float = 15) -> Result:
    async with asyncio.timeout(within):
        out, err = await process.communicate()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def apiops(url: str, *args: str, key: str | None = KEYS["writer"][0]) -> Result:
    return await finish(await start(url, *args, key=key))


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    async with live_api(settings) as base_url, running_worker(settings):
        yield base_url


@pytest.fixture
async def api(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, headers=headers("writer")) as client:
        yield client


def assert_one_error_line(result: Result, *fragments: str) -> None:
    assert result.code == 3, result
    assert result.out == ""
    assert len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith("apiops: ") and "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err


async def test_submit_takes_key_values_or_json_and_get_and_list_show_the_jobs(
    url: str, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    first = await apiops(url, "submit", "noop", "steps=2", "sleep_s=0", "target=db/x")
    assert first.code == 0, first
    first_id = first.out.strip()
    job = (await api.get(f"/ops/jobs/{first_id}")).json()
    assert job["params"] == {"steps": 2, "sleep_s": 0, "fail_at_step": None, "target": "db/x"}

    params_file = tmp_path / "params.json"
    params_file.write_text('{"steps": 1}')
    second = await apiops(url, "submit", "noop", "--json", f"@{params_file}", "--output", "json")
    assert second.code == 0, second
    second_job = json.loads(second.out)
    assert second_job["type"] == "noop" and len(second_job["steps"]) == 1
    inline = await apiops(url, "submit", "noop", "--json", '{"steps": 3}', "--idempotency-key", "k-1")
    again = await apiops(url, "submit", "noop", "--json", '{"steps": 3}', "--idempotency-key", "k-1")
    assert inline.code == again.code == 0 and inline.out == again.out
    await wait_for_status(api, first_id, "success")

    shown, shown_json, listed, paged, one_page, by_target = await asyncio.gather(
        apiops(url, "get", first_id),
        apiops(url, "get", first_id, "-o", "json"),
        apiops(url, "list"),
        apiops(url, "list", "--limit", "1", "--all", "--output", "json"),
        apiops(url, "list", "--limit", "1", "-o", "json"),
        apiops(url, "list", "--target", "noop/db/x", "--status", "success"),
    )
    assert shown.code == 0, shown
    assert f"job:      {first_id}" in shown.lines
    assert re.search(r"^status:\s+success in \d+\.\ds$", shown.out, re.M)
    assert re.search(r"^step-2\s+success\s+1\s+\d+\.\ds\s+slept 0s$", shown.out, re.M), shown.out
    assert json.loads(shown_json.out)["status"] == "success"

    ids = [line.split()[0] for line in listed.lines[1:]]
    assert listed.lines[0].split()[:3] == ["JOB", "TYPE", "STATUS"]
    assert ids == [inline.out.strip(), second_job["job_id"], first_id]  # newest first
    assert [j["job_id"] for j in json.loads(paged.out)] == ids
    assert len(json.loads(one_page.out)) == 1
    assert [line.split()[0] for line in by_target.lines[1:]] == [first_id]


async def test_submit_watch_piped_prints_each_step_running_then_success_and_exits_0(url: str) -> None:
    result = await apiops(url, "submit", "noop", "steps=3", "sleep_s=0.2", "--watch")
    assert result.code == 0, result
    job_id, *lines = result.lines
    assert job_id.startswith("noop-")
    changes = [re.sub(r"^\d+\.\ds ", "", line) for line in lines]
    assert all(re.match(r"^\d+\.\ds ", line) for line in lines), lines
    expected = []
    for n in (1, 2, 3):
        expected += [f"step-{n} running", f"step-{n} running: sleeping 0.2s", f"step-{n} success: slept 0.2s"]
    assert [c for c in changes if c.startswith("step-")] == expected
    assert changes[0] == "job created by writer" and changes[-1] == "job success"
    assert result.err == ""


async def test_watch_exits_1_when_the_job_fails(url: str) -> None:
    result = await apiops(url, "submit", "noop", "steps=3", "fail_at_step=2", "--watch")
    assert result.code == 1, result
    assert "step-2 failed: NoopFailure: failed on purpose at step 2" in result.out
    assert result.lines[-1].endswith("job failed: step step-2 failed: NoopFailure: failed on purpose at step 2")


async def test_cancel_ends_a_watch_with_2_and_retry_runs_the_job_to_success(url: str, api: httpx.AsyncClient) -> None:
    # Long enough for `apiops cancel` to start up and land while step-1 runs, even on a loaded machine (where
    # starting a Python process can take seconds); the retried run below takes as long.
    job_id = (await apiops(url, "submit", "noop", "steps=1", "sleep_s=6")).out.strip()
    watcher = await start(url, "watch", job_id)
    await wait_for_status(api, job_id, "running")
    cancelled = await apiops(url, "cancel", job_id)
    assert cancelled.code == 0 and "cancel requested" in cancelled.out, cancelled
    watched = await finish(watcher)
    assert watched.code == 2, watched
    assert re.search(r"job cancelled: cancelled by writer at \S+$", watched.lines[-1]), watched.lines
    assert re.search(r"step-1 cancelled", watched.out)

    # The history now holds a `finished`: watching the retried job must wait for the next one.
    retried = await apiops(url, "retry", job_id)
    assert retried.code == 0 and "pending again" in retried.out, retried
    rewatched = await apiops(url, "watch", job_id)
    assert rewatched.code == 0, rewatched
    assert rewatched.lines[-1].endswith("job success")
    assert "job retried by writer" in rewatched.out

    again = await apiops(url, "cancel", job_id)
    assert_one_error_line(again, "409 conflict", "already success")


async def test_ctrl_c_stops_watching_with_130_and_no_traceback(url: str, api: httpx.AsyncClient) -> None:
    job_id = (await apiops(url, "submit", "noop", "steps=1", "sleep_s=30")).out.strip()
    watcher = await start(url, "watch", job_id)
    await wait_for_status(api, job_id, "running")
    assert watcher.stdout is not None
    async with asyncio.timeout(5):
        while b"step-1 running" not in await watcher.stdout.readline():
            pass
    watcher.send_signal(signal.SIGINT)
    result = await finish(watcher)
    assert result.code == 130
    assert result.err == "apiops: interrupted; the job goes on\n"
    assert (await api.get(f"/ops/jobs/{job_id}")).json()["status"] == "running"


async def test_api_errors_are_one_line_and_never_show_the_key(url: str) -> None:
    unknown_type, bad_params, no_job, no_watch, bad_key, no_key, reader, usage = await asyncio.gather(
        apiops(url, "submit", "nope"),
        apiops(url, "submit", "noop", "steps=99"),
        apiops(url, "get", "noop-x"),
        apiops(url, "watch", "noop-x"),
        apiops(url, "list", key="secret-but-wrong"),
        apiops(url, "list", key=None),
        apiops(url, "submit", "noop", key=KEYS["reader"][0]),
        apiops(url, "submit", "noop", "steps"),
    )
    assert_one_error_line(unknown_type, "404 unknown_job_type", "noop")
    assert_one_error_line(bad_params, "422 invalid_params", "steps")
    assert_one_error_line(no_job, "404 not_found: no job 'noop-x'")
    assert_one_error_line(no_watch, "404 not_found: no job 'noop-x'")
    assert_one_error_line(bad_key, "401 unauthorized")
    assert "secret-but-wrong" not in bad_key.err
    assert_one_error_line(no_key, "401 unauthorized", "APIOPS_API_KEY")
    assert_one_error_line(reader, "403 forbidden")
    assert usage.code == 2 and "not key=value" in usage.err and "Traceback" not in usage.err


async def test_an_unreachable_api_is_one_line_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    results = await asyncio.gather(
        apiops(url, "list"),
        apiops(url, "watch", "noop-x"),
        apiops(url, "submit", "noop", "--watch"),
        apiops("http://127.0.0.1:1", "get", "x", "--url", url),  # the flag wins over APIOPS_URL
    )
    for result in results:
        assert_one_error_line(result, f"cannot reach {url}")


def _sse(*events: dict[str, object]) -> bytes:
    return b"".join(f"id: {e['event_id']}\nevent: {e['kind']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def _event(event_id: int, kind: str, **fields: object) -> dict[str, object]:
    return {"event_id": event_id, "kind": kind, "created_at": "2026-11-29T19:13:30.506393Z", **fields}


async def test_follow_resumes_after_the_last_event_seen_until_finished() -> None:
    """Drops are simulated in-process: a stream that ends early, a refused connection, a restarting server."""
    seen: list[str | None] = []
    answers: list[httpx.Response | Exception] = [
        httpx.Response(200, content=_sse(_event(1, "created"), _event(2, "claimed")) + b": keep-alive\n\n"),
        httpx.ConnectError("refused"),
        httpx.Response(503, json={"error": {"code": "dependency_unavailable", "message": "db down"}}),
        httpx.Response(200, content=_sse(_event(3, "step", step="step-1", status="running"), _event(4, "finished"))),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("last-event-id"))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async with ApiClient("http://api.test", "k", transport=httpx.MockTransport(handler)) as client:
        events: list[JobEvent] = [e async for e in client.follow("noop-1")]
    assert [e.event_id for e in events] == [1, 2, 3, 4]
    assert seen == [None, "2", "2", "2"]

    def forbidden(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"error": {"code": "forbidden", "message": "no"}})

    async with ApiClient("http://api.test", "k", transport=httpx.MockTransport(forbidden)) as client:
        with pytest.raises(ApiError, match="403 forbidden: no"):
            [e async for e in client.follow("noop-1", 7)]


async def tmux(*args: str) -> str:
    process = await asyncio.create_subprocess_exec("tmux", *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    assert process.returncode == 0, args
    return out.decode()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
async def test_watch_on_a_terminal_redraws_the_table_in_place(url: str, tmp_path: Path) -> None:
    server = ["-L", f"apiops-test-{secrets.token_hex(4)}"]  # a tmux server of its own: the user's is left alone
    exit_file = tmp_path / "exit"
    command = f"{APIOPS} submit noop steps=4 sleep_s=0.3 --watch; echo $? > {exit_file}; sleep 60"
    env = [f"-e{name}={value}" for name, value in cli_env(url, KEYS["writer"][0]).items() if name.startswith("APIOPS")]
    await tmux(*server, "new-session", "-d", "-x", "120", "-y", "30", *env, command)
    try:
        screens: list[str] = []
        async with asyncio.timeout(10):
            while not exit_file.exists() or not exit_file.read_text():
                screens.append(await tmux(*server, "capture-pane", "-p"))
                await asyncio.sleep(0.05)
        final = await tmux(*server, "capture-pane", "-p")
    finally:
        await tmux(*server, "kill-server")
    assert exit_file.read_text().strip() == "0"
    assert any(re.search(r"^step-2\s+running\s+\d+\.\ds\s+sleeping 0.3s", s, re.M) for s in screens), screens
    for n in range(1, 5):
        # Redrawn, not appended: each step is on the screen once, in its final state.
        assert len(re.findall(rf"^step-{n}\b", final, re.M)) == 1, final
        assert re.search(rf"^step-{n}\s+success\s+\d+\.\ds\s+slept 0.3s$", final, re.M), final
    assert re.search(r"^noop-\S+ \(noop\) success in \d+\.\ds$", final, re.M), final


async def test_list_says_when_nothing_matches_when_more_pages_exist_and_when_a_type_is_unknown(
    url: str, api: httpx.AsyncClient
) -> None:
    first = await apiops(url, "submit", "noop", "steps=1")
    second = await apiops(url, "submit", "noop", "steps=1")
    await wait_for_status(api, second.out.strip(), "success")
    one_page, nothing, unknown, since = await asyncio.gather(
        apiops(url, "list", "--limit", "1"),
        apiops(url, "list", "--since", "2999-01-01T00:00:00Z"),
        apiops(url, "list", "--type", "nope"),
        apiops(url, "list", "--since", "2000-01-01T00:00:00Z", "-o", "json"),
    )
    assert one_page.code == 0 and len(one_page.lines) == 2, one_page
    assert one_page.err == "apiops: more jobs match than these 1; --all lists them all\n"
    assert nothing.code == 0 and nothing.out == "" and nothing.err == "apiops: no jobs match\n"
    assert unknown.code == 2 and unknown.out == ""
    assert unknown.err.startswith("apiops: unknown job type 'nope'; known types: ") and "noop" in unknown.err
    assert [job["job_id"] for job in json.loads(since.out)] == [second.out.strip(), first.out.strip()]


async def test_global_options_go_before_or_after_the_command_and_get_shows_json_params_and_utc_times(
    url: str, api: httpx.AsyncClient
) -> None:
    job_id = (await apiops(url, "submit", "noop", "steps=1", "target=db/y")).out.strip()
    await wait_for_status(api, job_id, "success")
    no_scheme = url.removeprefix("http://")
    before = await apiops("http://127.0.0.1:1", "--url", no_scheme, "-o", "json", "get", job_id)
    assert before.code == 0, before
    assert json.loads(before.out)["job_id"] == job_id
    shown = await apiops(url, "get", job_id)
    params = next(line for line in shown.lines if line.startswith("params:"))
    assert json.loads(params.removeprefix("params:")) == {
        "steps": 1,
        "sleep_s": 0,
        "fail_at_step": None,
        "target": "db/y",
    }
    assert re.search(r"^created:\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$", shown.out, re.M), shown.out
    listed = await apiops(url, "list")
    assert re.search(rf"^{job_id}\s.*\s\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\dZ$", listed.out, re.M), listed.out


async def test_a_dry_run_is_marked_in_list_and_get(url: str) -> None:
    params = ["namespace=db", "cluster=pg", "pod=pg-1", "dry_run=true"]
    job_id = (await apiops(url, "submit", "pg-rebuild", *params)).out.strip()
    listed, shown = await asyncio.gather(apiops(url, "list"), apiops(url, "get", job_id))
    assert re.search(rf"^{job_id}\s+pg-rebuild \(dry run\)\s", listed.out, re.M), listed.out
    assert "type:     pg-rebuild (dry run: changes nothing)" in shown.lines


async def test_job_types_lists_each_type_with_its_params_and_steps(url: str) -> None:
    text, as_json = await asyncio.gather(apiops(url, "job-types"), apiops(url, "job-types", "-o", "json"))
    assert text.code == 0, text
    assert any(line.startswith("noop: ") for line in text.lines)
    assert "  param steps (default 2); how many steps the job has" in text.lines
    assert "  param namespace (required); the cluster's namespace" in text.lines
    rebuild = next(t for t in json.loads(as_json.out) if t["name"] == "pg-rebuild")
    assert f"  steps: {', '.join(rebuild['steps'])}" in text.lines
