"""The benchmark's own stack: its database and Redis db (recreated and flushed at start, nothing else touched),
and the API, the service's workers and the floor's workers as real processes, whose memory and CPU are read from
/proc."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import asyncpg
import httpx
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from service.api.session import COOKIE
from service.db import asyncpg_dsn
from service.heartbeats import live_workers
from service.settings import DEV_API_KEY, get_settings

BENCH_DATABASE = "apiops_bench"
# Tests use db 13; the benchmark flushes only this one (FLUSHDB on its own index).
BENCH_REDIS_DB = 14
SERVICE_QUEUE = "apiops-bench:queue"
FLOOR_QUEUE = "apiops-bench:floor"
FLOOR_SCHEMA = "floor"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Stack:
    """Where everything of the benchmark lives: URLs derived from the user's settings (host, port, user), with
    the benchmark's own database name and Redis db index."""

    database_url: str
    redis_url: str
    api_port: int
    logs: Path

    @property
    def dsn(self) -> str:
        """The same database for asyncpg, which does not know SQLAlchemy's `+asyncpg` driver suffix."""
        return asyncpg_dsn(self.database_url)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self, queue: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APIOPS_")}
        env |= {
            "APIOPS_ENV": "dev",
            "APIOPS_DATABASE_URL": self.database_url,
            "APIOPS_REDIS_URL": self.redis_url,
            "APIOPS_QUEUE_NAME": queue,
            "APIOPS_HOST": "127.0.0.1",
            "APIOPS_PORT": str(self.api_port),
            "APIOPS_LOG_LEVEL": "WARNING",
        }
        return env


def make_stack(logs: Path) -> Stack:
    base = get_settings()
    database_url = make_url(base.database_url.get_secret_value()).set(database=BENCH_DATABASE)
    redis = make_url(base.redis_url.get_secret_value())
    redis_url = f"redis://{redis.host or '127.0.0.1'}:{redis.port or 6379}/{BENCH_REDIS_DB}"
    logs.mkdir(parents=True, exist_ok=True)
    return Stack(database_url.render_as_string(hide_password=False), redis_url, free_port(), logs)


async def prepare(stack: Stack) -> None:
    """A fresh database, migrated by the service's own command, plus the floor's schema; an empty Redis db."""
    url = make_url(stack.database_url)
    assert url.database == BENCH_DATABASE, "the benchmark only ever drops its own database"
    admin = await asyncpg.connect(asyncpg_dsn(stack.database_url, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{BENCH_DATABASE}" WITH (FORCE)')
    finally:
        await admin.close()
    await asyncio.to_thread(_migrate, stack)
    conn = await asyncpg.connect(stack.dsn)
    try:
        await create_floor_schema(conn)
        await checkpoint(conn)
    finally:
        await conn.close()
    redis = Redis.from_url(stack.redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


async def checkpoint(conn: asyncpg.Connection) -> None:
    """Write out what earlier phases (or an earlier run) left dirty, so that the next measure does not share the
    disk with a checkpoint: back to back, a second run's figures came out 20-30% slower. Needs a superuser or
    pg_checkpoint; without, the run goes on unquieted."""
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        pass


def _migrate(stack: Stack) -> None:
    with open(stack.logs / "migrate.log", "wb") as log:
        command = [sys.executable, "-m", "service.cli", "db", "upgrade"]
        subprocess.run(command, env=stack.env(SERVICE_QUEUE), check=True, stdout=log, stderr=subprocess.STDOUT)


async def create_floor_schema(conn: asyncpg.Connection) -> None:
    """The floor writes tables shaped like the service's (columns, defaults, checks, indexes, foreign keys) in a
    schema of its own, so that the service's reapers never see its rows. No NOTIFY trigger: live events are a
    feature of the service, and their cost belongs in the gap to the floor."""
    s = FLOOR_SCHEMA
    await conn.execute(
        f"""
        CREATE SCHEMA {s};
        CREATE TABLE {s}.ops_job (LIKE public.ops_job INCLUDING ALL);
        CREATE TABLE {s}.ops_job_step (LIKE public.ops_job_step INCLUDING ALL);
        CREATE TABLE {s}.ops_job_event (LIKE public.ops_job_event INCLUDING ALL);
        ALTER TABLE {s}.ops_job_step ADD FOREIGN KEY (job_id) REFERENCES {s}.ops_job (job_id) ON DELETE CASCADE;
        ALTER TABLE {s}.ops_job_event ADD FOREIGN KEY (job_id) REFERENCES {s}.ops_job (job_id) ON DELETE CASCADE;
        """
    )


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def memory_kb(self) -> tuple[int, int]:
        """(peak RSS, current RSS) in KiB: VmHWM and VmRSS."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
        return values["VmHWM"], values["VmRSS"]

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.popen.returncode}; see {self.log.name}")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); `fields` starts at field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_of_command(comm: str) -> float:
    """CPU seconds of every process whose command name is `comm` (all PostgreSQL backends, say): diffs of this
    show where the machine's two cores went during a phase."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    total += proc_cpu_s(int(entry.name))
            except OSError:
                continue
    return total


def _start(stack: Stack, name: str, command: list[str], queue: str) -> Proc:
    log = open(stack.logs / f"{name}.log", "wb")  # closed by stop()
    popen = subprocess.Popen(command, env=stack.env(queue), stdout=log, stderr=subprocess.STDOUT)
    return Proc(name, popen, log)


def start_api(stack: Stack) -> Proc:
    # What `apiops serve` runs (service/cli/main.py), started directly so that its pid is uvicorn's own.
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app", "--host", "127.0.0.1",
        "--port", str(stack.api_port), "--no-proxy-headers", "--no-access-log",
        "--http", "service.api.bounded_http:BoundedHttpProtocol",
    ]  # fmt: skip
    return _start(stack, "api", command, SERVICE_QUEUE)


def start_worker(stack: Stack, number: int) -> Proc:
    return _start(stack, f"worker-{number}", [sys.executable, "-m", "arq", "jobs.worker.WorkerSettings"], SERVICE_QUEUE)


def start_floor_worker(stack: Stack, number: int) -> Proc:
    command = [sys.executable, "-m", "arq", "tests.bench.floor.FloorWorkerSettings"]
    return _start(stack, f"floor-worker-{number}", command, FLOOR_QUEUE)


async def wait_api(stack: Stack, proc: Proc) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(timeout=1) as client:
        while time.monotonic() < deadline:
            proc.check_alive()
            try:
                if (await client.get(f"{stack.api_url}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the API did not become ready within {READY_TIMEOUT_S:g}s; see {proc.log.name}")


async def wait_worker(redis: Redis, proc: Proc, floor: bool) -> None:
    """A service worker is ready once its heartbeat (written at start-up, just before arq's poll loop) names its
    pid; a floor worker sets a key of its own."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        proc.check_alive()
        if floor:
            if await redis.exists(f"{FLOOR_QUEUE}:ready:{proc.pid}"):
                return
        elif any(beat.get("pid") == proc.pid for beat in await live_workers(redis, SERVICE_QUEUE)):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not become ready within {READY_TIMEOUT_S:g}s; see {proc.log.name}")


def stop(procs: list[Proc]) -> None:
    """SIGTERM (a worker hands its jobs back, uvicorn drains), then SIGKILL whatever is still there."""
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        try:
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
        proc.log.close()


async def console_session(url: str) -> str:
    """A console session of the development key, signed in as a browser does: the `cookie` header's value."""
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/ui/sign-in", data={"key": DEV_API_KEY}, headers={"Origin": url})
    if response.status_code != 303:
        raise RuntimeError(f"console sign-in: {response.status_code} {response.text[:200]}")
    return f"{COOKIE}={response.cookies[COOKIE]}"
