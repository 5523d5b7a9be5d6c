"""`apiops run` as an operator starts it: uvicorn and the arq CLI (`arq jobs.worker.WorkerSettings`) as real
processes, reached over real HTTP, stopped with Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.conftest import KEYS, free_port, headers, running_worker, wait_for, wait_for_status
from tests.processes import APIOPS, service_env, serving_api, wait_ready


async def test_apiops_run_serves_and_works_until_ctrl_c(settings: Settings) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        APIOPS,
        "run",
        env=service_env(settings, port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_ready(port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers("writer")) as api:

            async def workers() -> Any:
                return (await api.get("/ops/workers")).json()["workers"]

            await wait_for(workers, within=15, interval=0.1)  # its heartbeat: the worker has started
            job_id = (await api.post("/ops/jobs/noop", json={"steps": 3})).json()["job_id"]
            job = await wait_for_status(api, job_id, "success", "failed", within=2)

        assert job["status"] == "success"
        assert [s["status"] for s in job["steps"]] == ["success"] * 3
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()[-2000:]
    log = stderr.decode()
    assert "claimed job" in log and "SIGTERM: taking no more jobs" in log


# Stops, as a supervisor, a container runtime and a person at a terminal make them.


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _pid_inside(pid: int) -> int:
    """The number process `pid` has in its own (innermost) PID namespace."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    (nspid,) = (line for line in status if line.startswith("NSpid:"))
    return int(nspid.split()[-1])


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # exited; only its parent's (init's) reaping is left


async def _lines_until(stream: asyncio.StreamReader, fragment: str, seen: list[str], within: float = 30) -> None:
    async with asyncio.timeout(within):
        while fragment not in (line := (await stream.readline()).decode()):
            assert line, f"the process ended before printing {fragment!r}; it printed: {''.join(seen)[-2000:]}"
            seen.append(line)
        seen.append(line)


async def test_sigterm_stops_apiops_serve_gracefully_and_frees_the_port(settings: Settings) -> None:
    async with serving_api(settings) as (process, port):
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert "Application shutdown complete" in stderr.decode() and "Traceback" not in stderr.decode()
    assert _refused(port)


@pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0, reason="a PID namespace needs unshare and root")
async def test_sigterm_stops_apiops_serve_as_pid_1_of_its_own_pid_namespace(settings: Settings) -> None:
    """As in a container: `apiops serve` is PID 1, which the kernel gives no default signal handlers."""
    port = free_port()
    outer = await asyncio.create_subprocess_exec(
        "unshare", "--pid", "--fork", "--kill-child", APIOPS, "serve",
        env=service_env(settings, port), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_ready(port)
        (server,) = _children(outer.pid)  # PID 1 inside; this is its number outside
        assert _pid_inside(server) == 1
        os.kill(server, signal.SIGTERM)
        async with asyncio.timeout(10):
            _, stderr = await outer.communicate()
    finally:
        if outer.returncode is None:
            outer.kill()
            await outer.wait()
    assert outer.returncode == 0, stderr.decode()[-2000:]
    assert "Application shutdown complete" in stderr.decode() and "Traceback" not in stderr.decode()
    assert _refused(port)


async def test_an_open_event_stream_ends_when_the_api_stops_and_does_not_hold_the_stop(settings: Settings) -> None:
    async with (
        serving_api(settings) as (process, port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers("writer")) as api,
    ):
        job_id = (await api.post("/ops/jobs/noop", json={"steps": 1})).json()["job_id"]  # no worker: pending
        async with api.stream("GET", f"/ops/jobs/{job_id}/events", timeout=30) as stream:
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("id: ")
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):  # uvicorn itself would wait for the stream for ever
                rest = [line async for line in lines]
        assert not any(line.startswith("id: ") for line in rest)  # it ended, with nothing new to say
        async with asyncio.timeout(10):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()[-2000:]


async def test_a_watch_says_it_waits_while_the_api_restarts_and_resumes_without_losing_an_event(
    settings: Settings,
) -> None:
    port = free_port()
    env = {**service_env(settings, port), "APIOPS_URL": f"http://127.0.0.1:{port}", "APIOPS_API_KEY": KEYS["writer"][0]}
    async with serving_api(settings, port) as (server, _):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers("writer")) as api:
            job_id = (await api.post("/ops/jobs/noop", json={"steps": 3})).json()["job_id"]  # no worker yet
        watcher = await asyncio.create_subprocess_exec(
            APIOPS, "watch", job_id, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert watcher.stdout is not None and watcher.stderr is not None
        out: list[str] = []
        await _lines_until(watcher.stdout, "job created", out)
        server.send_signal(signal.SIGTERM)  # as a rolling update stops a replica
        err: list[str] = []
        await _lines_until(watcher.stderr, "event stream lost", err)
    # The job runs while no API answers; then a new replica comes up where the old one was.
    async with running_worker(settings), serving_api(settings, port):
        await _lines_until(watcher.stderr, "event stream back", err)
        async with asyncio.timeout(30):
            rest, more_err = await watcher.communicate()
    lines = out + rest.decode().splitlines(keepends=True)
    assert watcher.returncode == 0, (lines, err, more_err.decode())
    assert lines[-1].rstrip().endswith("job success")
    events = [line.split(" ", 1)[1] for line in lines]  # without the elapsed time
    for step in ("step-1", "step-2", "step-3"):  # every step's end, shown once: nothing lost, nothing twice
        assert sum(e.startswith(f"{step} success") for e in events) == 1, lines
    assert "Traceback" not in "".join(err) + more_err.decode()


async def _run(settings: Settings, port: int) -> asyncio.subprocess.Process:
    # A session of its own, as in a terminal: Ctrl-C is SIGINT to the whole foreground process group.
    return await asyncio.create_subprocess_exec(
        APIOPS, "run", env=service_env(settings, port), stderr=asyncio.subprocess.PIPE, start_new_session=True
    )


@dataclass
class Running:
    """`apiops run` with one noop job claimed by its worker; `log` gathers what the processes printed."""

    process: asyncio.subprocess.Process
    job_id: str
    log: list[str]

    async def until(self, fragment: str) -> None:
        assert self.process.stderr is not None
        await _lines_until(self.process.stderr, fragment, self.log)

    async def exits(self, within: float) -> int:
        assert self.process.stderr is not None
        async with asyncio.timeout(within):
            self.log.append((await self.process.stderr.read()).decode())
            return await self.process.wait()


@asynccontextmanager
async def _running_job(settings: Settings, sleep_s: float) -> AsyncIterator[Running]:
    port = free_port()
    process = await _run(settings, port)
    try:
        await wait_ready(port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers("writer")) as api:
            submitted = await api.post("/ops/jobs/noop", json={"steps": 1, "sleep_s": sleep_s})
        running = Running(process, submitted.json()["job_id"], [])
        await running.until(f"claimed job {running.job_id}")
        yield running
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def test_ctrl_c_on_apiops_run_gives_the_running_step_its_grace(settings: Settings) -> None:
    async with _running_job(settings, sleep_s=2) as run:
        os.killpg(run.process.pid, signal.SIGINT)
        await run.until(f"job {run.job_id}: success")
        assert await run.exits(within=30) == 0
    log = "".join(run.log)
    assert "SIGTERM: taking no more jobs; 1 running job(s)" in log
    assert "again" not in log and "Traceback" not in log


async def test_a_second_ctrl_c_stops_at_once_without_a_traceback_and_hands_the_job_back(
    settings: Settings, db: Any
) -> None:
    async with _running_job(settings, sleep_s=60) as run:
        os.killpg(run.process.pid, signal.SIGINT)
        await run.until("taking no more jobs")
        os.killpg(run.process.pid, signal.SIGINT)
        assert await run.exits(within=10) == 0  # not the 20 s grace, nor the step's 60 s
    log = "".join(run.log)
    assert "apiops: stopping now" in log and "SIGTERM again: stopping now" in log
    assert "Traceback" not in log
    job = await db.fetchrow("SELECT status, lease_owner FROM ops_job WHERE job_id = $1", run.job_id)
    assert (job["status"], job["lease_owner"]) == ("pending", None)  # handed back for another worker


async def test_children_of_apiops_run_die_with_it_even_on_sigkill(settings: Settings) -> None:
    port = free_port()
    process = await _run(settings, port)
    try:
        await wait_ready(port)
        children = _children(process.pid)
        assert len(children) == 2
        process.kill()
        await process.wait()

        async def all_gone() -> bool:
            return all(_gone(child) for child in children)

        await wait_for(all_gone, within=30, interval=0.05)
        assert _refused(port)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for child in _children(process.pid) if not _gone(process.pid) else []:
            os.kill(child, signal.SIGKILL)
