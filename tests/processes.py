"""Real processes for the tests that stop, kill or run several of them: arq workers and `apiops serve` started as
an operator would, and a Redis server of the test's own (on a free port, so stopping it disturbs nobody else's
Redis). The network between them fails through `tests.proxy.TcpProxy`."""

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

from service.jobtypes import Registry
from service.settings import Settings
from tests import kit_worker
from tests.conftest import free_port, key_entries, wait_for

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


@asynccontextmanager
async def serving_api(
    settings: Settings, port: int | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """`apiops serve` answering on `port` (by default one of its own), with its stderr piped; killed at the end if
    still running."""
    port = port or free_port()
    process = await asyncio.create_subprocess_exec(
        APIOPS, "serve", env=service_env(settings, port), stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_ready(port)
        yield process, port
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


REPO = Path(__file__).resolve().parents[1]
SKEWED_CLOCK = REPO / "tests" / "skewed_clock"


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


async def start_job_worker(
    work: Path, name: str, settings: Settings, registry: Registry, clock_skew_s: float = 0.0
) -> asyncio.subprocess.Process:
    """The real worker in a process of its own, with `registry`'s job types (tests/kit_worker.py); its log goes to
    `work/<name>.log` (appended to); its wall clock `clock_skew_s` off (tests/skewed_clock)."""
    config = kit_worker.write(work / f"{name}.pickle", settings, registry)
    env = dict(os.environ)
    if clock_skew_s:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SKEWED_CLOCK), env.get("PYTHONPATH")]))
        env["APIOPS_TEST_CLOCK_SKEW_S"] = str(clock_skew_s)
    with (work / f"{name}.log").open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.kit_worker", str(config), cwd=REPO, stderr=log, env=env
        )


@asynccontextmanager
async def job_worker(
    work: Path, name: str, settings: Settings, registry: Registry, clock_skew_s: float = 0.0
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`start_job_worker` for the block; SIGKILLed at the end if still running."""
    process = await start_job_worker(work, name, settings, registry, clock_skew_s)
    try:
        yield process
    finally:
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
