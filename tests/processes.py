"""Real processes for the crash tests: arq workers and the API started as an operator would, and a Redis server of
the test's own (on a free port, so stopping it disturbs nobody else's Redis)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from service.settings import Settings
from tests.conftest import key_entries, wait_for

APIOPS = str(Path(sys.executable).with_name("apiops"))


def service_env(settings: Settings, port: int, **overrides: Any) -> dict[str, str]:
    """The environment of `apiops run` or `apiops serve` on `port`, for the test's database, Redis, queue and keys,
    with `overrides` as `APIOPS_<NAME>`; nothing else of the test's own `APIOPS_*`."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("APIOPS_")},
        "APIOPS_DATABASE_URL": settings.database_url.get_secret_value(),
        "APIOPS_REDIS_URL": settings.redis_url.get_secret_value(),
        "APIOPS_QUEUE_NAME": settings.queue_name,
        "APIOPS_API_KEYS": "[" + ",".join(k.model_dump_json() for k in key_entries()) + "]",
        "APIOPS_PORT": str(port),
    }
    env.update({f"APIOPS_{key.upper()}": str(value) for key, value in overrides.items()})
    return env


async def wait_ready(port: int, within: float = 30) -> None:
    """Until the API on `port` answers /readyz with 200."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as probe:

        async def answers() -> bool:
            try:
                return (await probe.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(answers, within=within, interval=0.05)


def worker_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    env = {
        **os.environ,
        "APIOPS_DATABASE_URL": settings.database_url.get_secret_value(),
        "APIOPS_REDIS_URL": settings.redis_url.get_secret_value(),
        "APIOPS_QUEUE_NAME": settings.queue_name,
    }
    env.update({f"APIOPS_{key.upper()}": str(value) for key, value in overrides.items()})
    return env


async def start_worker(settings: Settings, **overrides: Any) -> asyncio.subprocess.Process:
    """`arq jobs.worker.WorkerSettings` in its own process; output goes to the test's log capture."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arq", "jobs.worker.WorkerSettings", env=worker_env(settings, **overrides)
    )


async def stop(process: asyncio.subprocess.Process, signum: int = signal.SIGTERM, within: float = 30) -> int:
    if process.returncode is None:
        process.send_signal(signum)
    async with asyncio.timeout(within):
        return await process.wait()


@asynccontextmanager
async def workers(settings: Settings, count: int, **overrides: Any) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """`count` worker processes; SIGKILLed at the end if still running (tests stop them as they need)."""
    started = [await start_worker(settings, **overrides) for _ in range(count)]
    try:
        yield started
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()
                await process.wait()


class RedisServer:
    """A redis-server process of the test's own, which it may stop and start again on the same port."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.process: asyncio.subprocess.Process | None = None
        self.url = f"redis://127.0.0.1:{port}/0"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = Redis.from_url(self.url)

        async def answers() -> bool:
            try:
                return bool(await client.ping())
            except OSError:
                return False
            except Exception as exc:  # redis-py wraps refused connections
                if "connect" not in str(exc).lower():
                    raise
                return False

        try:
            await wait_for(answers, within=10, interval=0.05)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        self.process = None


class TcpProxy:
    """Forwards a local port to another address; `cut()` drops every connection and refuses new ones until
    `restore()`: a network outage for whoever connects through it, and nobody else."""

    def __init__(self, port: int, upstream_host: str, upstream_port: int) -> None:
        self.port = port
        self.upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    def stall(self) -> None:
        """Forward nothing more, in either direction, until `flow()`; connections stay open and new ones are
        accepted: a server or a network that stops answering, rather than one that is down."""
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()
