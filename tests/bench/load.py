"""Load generation: a small keep-alive HTTP/1.1 client, closed-loop and open-loop drivers, and percentiles.

The client is hand-rolled because on a 2-core machine the load generator competes with the API for CPU: httpx
spends several times more CPU per request than these few lines, and that would be charged to the service. Its
CPU is measured anyway (`CpuMeter`), so a report can show the client was not the limit.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tests.bench.stack import Proc, cpu_of_command

T = TypeVar("T")
# An open-loop run never holds more requests than this in flight: a stalled server ends the run with errors
# instead of growing the client's memory without bound.
MAX_IN_FLIGHT = 2000
# uvicorn closes a keep-alive connection idle for 5 s; one idle for longer than this is reopened before use, so
# that a request never races the server's close.
IDLE_REOPEN_S = 3.0


class HttpError(Exception):
    pass


class _Connection:
    def __init__(self, host: str, port: int, headers: bytes) -> None:
        self.host, self.port, self.headers = host, port, headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used_at = 0.0

    async def request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if time.monotonic() - self.used_at > IDLE_REOPEN_S:
            self.close()
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self.headers
        if body is not None:
            head += b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        self.writer.write(head + b"\r\n" + (body or b""))
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length: int | None = None
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        if length is None:
            raise HttpError(f"{method} {path}: response without content-length")
        data = await self.reader.readexactly(length)
        self.used_at = time.monotonic()
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class HttpClient:
    """`size` keep-alive connections to one server, each used by one request at a time."""

    def __init__(self, host: str, port: int, api_key: str, size: int, cookie: str | None = None) -> None:
        """`cookie`: a console session instead of the key (`name=value`)."""
        credentials = f"cookie: {cookie}" if cookie else f"x-api-key: {api_key}"
        headers = f"host: {host}:{port}\r\n{credentials}\r\n".encode()
        self._idle: asyncio.LifoQueue[_Connection] = asyncio.LifoQueue()
        self._all = [_Connection(host, port, headers) for _ in range(size)]
        for connection in self._all:
            self._idle.put_nowait(connection)

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        connection = await self._idle.get()
        try:
            return await connection.request(method, path, body)
        except BaseException:
            connection.close()  # its stream state is unknown now
            raise
        finally:
            self._idle.put_nowait(connection)

    def close(self) -> None:
        for connection in self._all:
            connection.close()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Run(Generic[T]):
    latencies: list[float] = field(default_factory=list)
    results: list[T] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.results) / self.elapsed if self.elapsed else math.nan

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)


async def _timed(run: Run[T], call: Callable[[], Awaitable[T]], started: float) -> None:
    try:
        result = await call()
    except Exception as exc:
        run.errors.append(f"{type(exc).__name__}: {exc}")
        return
    run.latencies.append(time.perf_counter() - started)
    run.results.append(result)


async def closed_loop(count: int, concurrency: int, call: Callable[[], Awaitable[T]]) -> Run[T]:
    """`count` calls by `concurrency` callers, each starting its next call when the last one ends."""
    run: Run[T] = Run()
    remaining = iter(range(count))

    async def caller() -> None:
        for _ in remaining:
            await _timed(run, call, time.perf_counter())

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    run.elapsed = time.perf_counter() - started
    return run


async def open_loop(rate: float, duration_s: float, call: Callable[[], Awaitable[T]]) -> Run[T]:
    """A call every 1/rate seconds whatever the server does, for `duration_s`. Latency counts from the moment
    each call was due, so a server (or client) that falls behind cannot hide it by slowing the load down."""
    run: Run[T] = Run()
    tasks: set[asyncio.Task[None]] = set()
    count = int(rate * duration_s)
    started = time.perf_counter()
    for i in range(count):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= MAX_IN_FLIGHT:
            run.errors.append("too many requests in flight")
            continue
        task = asyncio.create_task(_timed(run, call, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    run.elapsed = time.perf_counter() - started
    return run


@dataclass
class CpuMeter:
    """CPU seconds spent during a block by the bench process, the API, the workers, PostgreSQL and Redis."""

    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    spent: dict[str, float] = field(default_factory=dict)

    def _sample(self) -> dict[str, float]:
        times = os.times()
        return {
            "client": times.user + times.system,
            "api": self.api.cpu_s() if self.api else 0.0,
            "workers": sum(w.cpu_s() for w in self.workers),
            "postgres": cpu_of_command("postgres"),
            "redis": cpu_of_command("redis-server"),
            "wall": time.perf_counter(),
        }

    @contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        before = self._sample()
        yield self.spent
        after = self._sample()
        # PostgreSQL backends that exit during the block take their CPU with them: never below zero.
        self.spent.update({key: round(max(0.0, after[key] - before[key]), 2) for key in before})
