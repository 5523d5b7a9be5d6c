"""The HTTP server's own bounds, against a real `apiops serve` over real sockets: slow and half-sent connections by
the thousand under a file limit of 1024, an oversized request head, and the connection cap; and, however the API is
started as documented, no forwarded address believed from an untrusted peer."""

from __future__ import annotations

import asyncio
import json
import resource
import shlex
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.conftest import free_port, headers
from tests.processes import APIOPS, service_env, wait_ready

# The file limit `apiops serve` runs under here, as in many containers: 1,000 client connections alone would use
# nearly all of it.
FILE_LIMIT = 1024
SLOW_CONNECTIONS = 1000


@dataclass
class Served:
    port: int
    log: Path

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def apiops_serve(port: int) -> list[str]:
    return [APIOPS, "serve"]


def documented_uvicorn(port: int) -> list[str]:
    """uvicorn's own command line as docs/operations.md gives it, on `port`."""
    lines = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("uvicorn service.api.app:create_app "))
    command = lines[first]
    for line in lines[first + 1 :]:
        if not command.endswith("\\"):
            break
        command = command[:-1] + line
    args = shlex.split(command)
    args[args.index("--port") + 1] = str(port)
    return [str(Path(sys.executable).with_name("uvicorn")), *args[1:]]


@asynccontextmanager
async def serving(
    settings: Settings, tmp_path: Path, command: Callable[[int], list[str]] = apiops_serve, **overrides: Any
) -> AsyncIterator[Served]:
    """The API started by `command` (by default `apiops serve`) under a file limit of FILE_LIMIT, with `overrides`
    as settings, its output in a file (a pipe nobody reads could fill up and stall it)."""

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command(port), env=service_env(settings, port, **overrides), stderr=out, preexec_fn=limit_files
        )
    try:
        await wait_ready(port)
        yield Served(port, log)
    finally:
        process.kill()
        await process.wait()


@pytest.fixture(autouse=True)
def _room_for_our_own_sockets() -> None:
    """The test itself holds a thousand sockets: raise its own soft file limit where the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * FILE_LIMIT
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"the test needs a file limit of {wanted}; the hard limit here is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def _slow_connections(port: int, count: int) -> AsyncIterator[list[asyncio.StreamReader]]:
    """`count` connections: the first half send nothing, the second half the start of a request head only. Yields
    what reads each; all are closed at the end."""
    opened: list[Connection] = []
    try:
        for i in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened.append((reader, writer))
            if i >= count // 2:
                writer.write(b"GET /livez HTTP/1.1\r\nHost: apiops\r\n")
        yield [reader for reader, _ in opened]
    finally:
        _close_all(opened)


def _close_all(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.transport.abort()


async def _answer(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await reader.read()


async def test_a_thousand_slow_connections_leave_livez_and_keyed_requests_answering(
    settings: Settings, tmp_path: Path
) -> None:
    async with serving(settings, tmp_path, header_timeout_s=120) as served:
        async with _slow_connections(served.port, SLOW_CONNECTIONS) as slow:
            async with httpx.AsyncClient(base_url=served.url(), timeout=5) as api:
                assert (await api.get("/livez")).status_code == 200
                keyed = await api.get("/ops/jobs", headers=headers("reader"))
                assert keyed.status_code == 200, keyed.text
                assert (await api.get("/readyz")).status_code == 200  # PostgreSQL and Redis still get their files
            # Room was made under the file limit by closing the connections that had waited longest, sending nothing.
            async with asyncio.timeout(5):
                assert await _answer(slow[0]) == b""
        log = served.log.read_text()
    assert "serving at most" in log and "the file limit (ulimit -n) is 1024" in log
    assert "Too many open files" not in log and "Traceback" not in log


async def test_slow_request_heads_are_closed_at_the_header_timeout_half_sent_ones_with_408(
    settings: Settings, tmp_path: Path
) -> None:
    async with (
        serving(settings, tmp_path, header_timeout_s=1) as served,
        _slow_connections(served.port, SLOW_CONNECTIONS) as slow,
        asyncio.timeout(30),
    ):
        answers = await asyncio.gather(*(_answer(reader) for reader in slow))
    idle, half_sent = answers[: SLOW_CONNECTIONS // 2], answers[SLOW_CONNECTIONS // 2 :]
    assert set(idle) == {b""}  # closed without a word: they never asked anything
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in half_sent), {a[:40] for a in half_sent}
    body = json.loads(half_sent[0].split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and "APIOPS_HEADER_TIMEOUT_S" in body["error"]["message"]


async def test_an_oversized_request_head_is_refused_with_431_and_does_not_stall_livez(
    settings: Settings, tmp_path: Path
) -> None:
    async with serving(settings, tmp_path) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)

        async def send_120_mib() -> None:
            writer.write(b"GET /livez HTTP/1.1\r\nHost: apiops\r\nX-Big: ")
            chunk = b"a" * (1 << 20)
            try:
                for _ in range(120):
                    writer.write(chunk)
                    await writer.drain()
            except ConnectionError:
                pass  # the server has answered and closed

        sending = asyncio.create_task(send_120_mib())
        async with httpx.AsyncClient(base_url=served.url(), timeout=2) as api:
            async with asyncio.timeout(10):
                status_line = await reader.readuntil(b"\r\n")
                assert (await api.get("/livez")).status_code == 200
                await sending
            # A head just under the limit is served as usual.
            assert (await api.get("/livez", headers={"X-Big": "a" * 15_000})).status_code == 200
        writer.transport.abort()
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large\r\n"


async def test_at_the_connection_cap_an_idle_connection_makes_room_and_busy_ones_mean_503(
    settings: Settings, tmp_path: Path
) -> None:
    async with (
        serving(settings, tmp_path, max_connections=2) as served,
        httpx.AsyncClient(base_url=served.url(), headers=headers("writer"), timeout=5) as api,
    ):
        job_id = (await api.post("/ops/jobs/noop", json={"steps": 1})).json()["job_id"]  # no worker: it stays pending
        async with api.stream("GET", f"/ops/jobs/{job_id}/events") as busy:  # a request in flight until closed
            assert busy.status_code == 200
            idle = await asyncio.open_connection("127.0.0.1", served.port)
            newcomer = await asyncio.open_connection("127.0.0.1", served.port)
            try:
                async with asyncio.timeout(5):
                    assert await _answer(idle[0]) == b""  # the idle one made room
                newcomer[1].write(b"GET /livez HTTP/1.1\r\nHost: apiops\r\nConnection: close\r\n\r\n")
                async with asyncio.timeout(5):
                    assert (await _answer(newcomer[0])).startswith(b"HTTP/1.1 200 ")
                async with api.stream("GET", f"/ops/jobs/{job_id}/events") as busy_too:
                    assert busy_too.status_code == 200
                    refused = await asyncio.open_connection("127.0.0.1", served.port)
                    async with asyncio.timeout(5):
                        answer = await _answer(refused[0])
                    refused[1].transport.abort()
            finally:
                _close_all([idle, newcomer])
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"


def _without_proxy_headers_flag(port: int) -> list[str]:
    return [arg for arg in documented_uvicorn(port) if arg != "--no-proxy-headers"]


@pytest.mark.parametrize(
    "command",
    [apiops_serve, documented_uvicorn, _without_proxy_headers_flag],
    ids=["apiops-serve", "documented-uvicorn", "uvicorn-without-no-proxy-headers"],
)
async def test_a_forged_x_forwarded_for_is_not_believed_however_the_api_is_started(
    settings: Settings, tmp_path: Path, command: Callable[[int], list[str]]
) -> None:
    async with (
        serving(settings, tmp_path, command) as served,
        httpx.AsyncClient(base_url=served.url(), headers=headers("writer"), timeout=5) as api,
    ):
        recorded = []
        for forged in ("203.0.113.9", "<script>", "9" * 3000):
            job = await api.post("/ops/jobs/noop", json={}, headers={"X-Forwarded-For": forged})
            assert job.status_code == 202, job.text
            recorded.append(job.json()["source_ip"])
        oversized = await api.get("/livez", headers={"X-Big": "a" * 20_000})  # the bounds hold here too
    assert recorded == ["127.0.0.1"] * 3
    assert oversized.status_code == 431


async def test_an_idle_kept_alive_connection_is_closed_after_apiops_keep_alive_s(
    settings: Settings, tmp_path: Path
) -> None:
    async with serving(settings, tmp_path, keep_alive_s=1) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /livez HTTP/1.1\r\nHost: apiops\r\n\r\n")
        await reader.readuntil(b'{"status":"ok"}')
        async with asyncio.timeout(3):  # uvicorn's default would keep it for 5 s
            assert await reader.read() == b""
        writer.transport.abort()
