"""`python -m tests.bench.hostile`: what slow and oversized clients cost `apiops serve` (docs/benchmark.md).

Starts `apiops serve` on a free port under a file limit of 1024, with the `APIOPS_*` settings of the environment (the
database must exist: `make migrate`), and prints:
- `/livez` and a keyed `GET /ops/jobs` while 1,000 (then 3,000) slow connections are open, half of them idle and
  half with half a request head sent, and how they end (408 at the header timeout, or closed to make room);
- how soon a 120 MiB request head is refused, and the slowest `/livez` while it is being sent.
"""

from __future__ import annotations

import asyncio
import collections
import os
import resource
import sys
import time
from pathlib import Path

import httpx

from service.settings import DEV_API_KEY
from tests.conftest import free_port

FILE_LIMIT = 1024
HEAD = b"GET /livez HTTP/1.1\r\nHost: apiops\r\n"


async def _get_ms(api: httpx.AsyncClient, path: str, **kwargs: object) -> str:
    started = time.perf_counter()
    response = await api.get(path, **kwargs)  # type: ignore[arg-type]
    return f"{response.status_code} in {(time.perf_counter() - started) * 1000:.1f} ms"


async def slow_connections(port: int, count: int) -> None:
    started = time.perf_counter()
    opened = []
    for i in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if i >= count // 2:
            writer.write(HEAD)
        opened.append((reader, writer))
    print(f"{count} slow connections opened in {time.perf_counter() - started:.2f} s")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
        print(f"  /livez: {await _get_ms(api, '/livez')}")
        print(f"  GET /ops/jobs with a key: {await _get_ms(api, '/ops/jobs', headers={'X-API-Key': DEV_API_KEY})}")

    async def end(reader: asyncio.StreamReader) -> tuple[float, str]:
        answer = await reader.read()
        return time.perf_counter() - started, answer.split(b"\r\n", 1)[0].decode() or "closed without an answer"

    ends = await asyncio.gather(*(end(reader) for reader, _ in opened))
    kinds = collections.Counter(kind for _, kind in ends)
    print(f"  all ended within {max(t for t, _ in ends):.2f} s of the first: {dict(kinds)}")
    for _, writer in opened:
        writer.transport.abort()


async def oversized_head(port: int, size: int = 120 << 20) -> None:
    latencies: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as api:
            while not done.is_set():
                started = time.perf_counter()
                await api.get("/livez")
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)

    probing = asyncio.create_task(probe())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> int:
        sent = 0
        writer.write(HEAD + b"X-Big: ")
        try:
            while sent < size:
                writer.write(b"a" * (1 << 20))
                sent += 1 << 20
                await writer.drain()
        except ConnectionError:
            pass
        return sent

    started = time.perf_counter()
    sending = asyncio.create_task(send())
    status = (await reader.readuntil(b"\r\n")).decode().strip()
    refused_after = time.perf_counter() - started
    sent = await sending
    await asyncio.sleep(0.5)
    done.set()
    await probing
    writer.transport.abort()
    print(f"a {size >> 20} MiB request head: {status!r} after {refused_after * 1000:.1f} ms ({sent >> 20} MiB sent)")
    print(f"  slowest of {len(latencies)} /livez meanwhile: {max(latencies) * 1000:.1f} ms")


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))


async def main() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, max(8192, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    port = free_port()
    apiops = str(Path(sys.executable).with_name("apiops"))
    env = {**os.environ, "APIOPS_PORT": str(port), "APIOPS_LOG_LEVEL": "WARNING"}
    server = await asyncio.create_subprocess_exec(
        apiops, "serve", env=env, stderr=asyncio.subprocess.DEVNULL, preexec_fn=_limit_files
    )
    try:
        async with httpx.AsyncClient(timeout=1) as probe:
            for _ in range(300):
                try:
                    if (await probe.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise SystemExit("apiops serve did not become ready within 30 s (is the database migrated?)")
        print(
            f"apiops serve, file limit {FILE_LIMIT}, header timeout {os.environ.get('APIOPS_HEADER_TIMEOUT_S', '10')} s"
        )
        for count in (1000, 3000):
            await slow_connections(port, count)
        await oversized_head(port)
    finally:
        server.terminate()
        await server.wait()


if __name__ == "__main__":
    asyncio.run(main())
