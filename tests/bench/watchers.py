"""`python -m tests.bench.watchers [--watchers 500 | --consoles 100]`: do many live-event watchers slow the API's
other requests?

Runs the API and a worker as processes (the benchmark's own database and Redis db), keeps 20 jobs running, and
measures `GET /ops/jobs/{id}` at a steady rate, first alone, then with N Server-Sent-Event streams open on those
jobs. The streams are read by a process of their own, so that their parsing does not delay the measuring
client; that process also reports how late each event reached it (receive time minus the event's `created_at`).
With `--consoles N`, each stream is a console's jobs page instead: `GET /ops/events` (every event of every job),
and after each burst of events the rows they name, fetched again from `/ui/rows`, as the page's script does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from service.settings import DEV_API_KEY
from tests.bench.load import HttpClient, open_loop, percentile
from tests.bench.stack import console_session, make_stack, prepare, start_api, start_worker, stop, wait_api, wait_worker

JOBS = 20
RATE = 100.0
SECONDS = 10.0
READY = "ready"


async def _watch(
    host: str, port: int, path: str, credentials: str, delays: list[float], opened: asyncio.Event,
    seen: Callable[[dict[str, Any]], None] | None = None,
) -> None:  # fmt: skip
    """One stream, read with a bare socket: httpx costs so much per line that with 500 streams in one process the
    delays measured would be mostly its own. Chunked framing is skipped; every message arrives whole in a chunk.
    `seen` is told of each event."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = f"GET {path} HTTP/1.1\r\nhost: {host}\r\n{credentials}\r\n\r\n"
        writer.write(request.encode())
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"stream {path}: {status!r}")
        await reader.readuntil(b"\r\n\r\n")
        opened_at = time.time()
        opened.set()
        while line := await reader.readline():
            if line.startswith(b"data: "):
                data = json.loads(line[6:])
                created = datetime.fromisoformat(data["created_at"]).timestamp()
                if created >= opened_at:  # the history before it is replayed, not delivered live
                    delays.append(time.time() - created)
                if seen is not None:
                    seen(data)
    finally:
        writer.close()


class Console:
    """What a console's jobs page does besides its stream, as console.js does it: an event of a job on the page
    changes its row in place (no request); for jobs that are not on it yet, at most every 250 ms, one GET /ui/rows
    over a connection of its own, and their rows are on the page from then on."""

    REFRESH_S = 0.25

    def __init__(self, host: str, port: int, cookie: str, shown: list[str], refreshes: list[float]) -> None:
        self.host, self.port, self.cookie = host, port, cookie
        self.shown = set(shown)  # the rows the page was rendered with
        self.changed: set[str] = set()
        self.refreshes = refreshes

    def seen(self, data: dict[str, Any]) -> None:
        if data["job_id"] not in self.shown:
            self.changed.add(data["job_id"])

    async def refresh(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            while True:
                await asyncio.sleep(self.REFRESH_S)
                if not self.changed:
                    continue
                ids, self.changed = ",".join(sorted(self.changed)), set()
                self.shown.update(ids.split(","))
                started = time.perf_counter()
                head = f"GET /ui/rows?ids={ids} HTTP/1.1\r\nhost: {self.host}\r\ncookie: {self.cookie}\r\n\r\n"
                writer.write(head.encode())
                answer = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"content-length: *([0-9]+)", answer, re.IGNORECASE)
                if b" 200 " not in answer.split(b"\r\n", 1)[0] or length is None:
                    raise RuntimeError(f"/ui/rows: {answer[:200]!r}")
                await reader.readexactly(int(length[1]))
                self.refreshes.append(time.perf_counter() - started)
        finally:
            writer.close()


async def open_streams(url: str, job_ids: list[str], watchers: int, cookie: str | None) -> None:
    """The watchers' process: open the streams, say READY, read them until stdin closes, print the delays. Each
    watches one job or, given a console session's `cookie`, is a console's jobs page: every job's events, and the
    rows they name fetched again."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    delays: list[float] = []
    refreshes: list[float] = []
    opened = [asyncio.Event() for _ in range(watchers)]
    tasks = []
    for i in range(watchers):
        if cookie is None:
            path = f"/ops/jobs/{job_ids[i % len(job_ids)]}/events"
            tasks.append(_watch(host, port, path, f"x-api-key: {DEV_API_KEY}", delays, opened[i]))
            continue
        console = Console(host, port, cookie, job_ids, refreshes)
        tasks.append(_watch(host, port, "/ops/events", f"cookie: {cookie}", delays, opened[i], console.seen))
        tasks.append(console.refresh())
    streams = [asyncio.create_task(task) for task in tasks]
    await asyncio.gather(*(event.wait() for event in opened))
    print(READY, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for stream in streams:
        stream.cancel()
    failed = [
        r for r in await asyncio.gather(*streams, return_exceptions=True) if not isinstance(r, asyncio.CancelledError)
    ]
    if failed:
        raise RuntimeError(f"a stream or refresh failed: {failed[0]!r}")
    print(json.dumps({"delays": delays, "refreshes": refreshes, "cpu_s": time.process_time()}), flush=True)


async def _reads(stack_port: int, job_ids: list[str]) -> tuple[float, float]:
    http = HttpClient("127.0.0.1", stack_port, DEV_API_KEY, size=16)
    calls = iter(range(10**9))
    try:
        run = await open_loop(RATE, SECONDS, lambda: http.request("GET", f"/ops/jobs/{job_ids[next(calls) % JOBS]}"))
    finally:
        http.close()
    return run.p(50) * 1000, run.p(99) * 1000


async def main(watchers: int, consoles: bool) -> dict[str, Any]:
    stack = make_stack(Path("var/bench-logs"))
    await prepare(stack)
    procs = [start_api(stack), start_worker(stack, 1)]
    try:
        await wait_api(stack, procs[0])
        redis = Redis.from_url(stack.redis_url)
        await wait_worker(redis, procs[1], floor=False)
        await redis.aclose()
        async with httpx.AsyncClient(base_url=stack.api_url, headers={"X-API-Key": DEV_API_KEY}) as client:
            job_ids = [
                (await client.post("/ops/jobs/noop", json={"steps": 20, "sleep_s": 2})).json()["job_id"]
                for _ in range(JOBS)
            ]
        await asyncio.sleep(2)  # every job claimed and running
        alone = await _reads(stack.api_port, job_ids)
        reader = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.bench.watchers", "--open-streams", str(watchers), "--url", stack.api_url,
            *(["--cookie", await console_session(stack.api_url)] if consoles else []),
            *job_ids, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert reader.stdin is not None and reader.stdout is not None
        if (await reader.stdout.readline()).decode().strip() != READY:
            raise RuntimeError("the watchers' process did not open its streams")
        api_cpu = procs[0].cpu_s()
        watched = await _reads(stack.api_port, job_ids)
        api_cpu = procs[0].cpu_s() - api_cpu
        reader.stdin.close()
        report = json.loads(await reader.stdout.read())
        await reader.wait()
        rss_mb = procs[0].memory_kb()[0] / 1024
    finally:
        stop(procs)
    return {"watchers": watchers, "consoles": consoles,
            "alone_ms": alone, "watched_ms": watched, "api_cpu_s": api_cpu, "api_rss_mb": rss_mb,
            "watchers_cpu_s": report["cpu_s"], "delays": report["delays"],
            "refreshes": report["refreshes"]}  # fmt: skip


def print_report(results: dict[str, Any]) -> None:
    Path("var").mkdir(exist_ok=True)
    name = "consoles" if results["consoles"] else "watchers"
    Path(f"var/{name}.json").write_text(json.dumps(results))
    watchers, alone, watched = results["watchers"], results["alone_ms"], results["watched_ms"]
    delays = sorted(results["delays"])
    print(f"GET /ops/jobs/{{id}} at {RATE:g}/s for {SECONDS:g}s, {JOBS} jobs running:")
    print(f"  alone:              p50 {alone[0]:.1f} ms  p99 {alone[1]:.1f} ms")
    print(f"  with {watchers} {name}: p50 {watched[0]:.1f} ms  p99 {watched[1]:.1f} ms")
    print(f"  ratio p50 {watched[0] / alone[0]:.2f}x  p99 {watched[1] / alone[1]:.2f}x")
    if delays:
        print(
            f"events delivered to watchers: {len(delays)}; delay p50 {percentile(delays, 50) * 1000:.0f} ms, "
            f"p99 {percentile(delays, 99) * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms"
        )
    refreshes = sorted(results["refreshes"])
    if refreshes:
        print(
            f"row refreshes (GET /ui/rows): {len(refreshes)}; p50 {percentile(refreshes, 50) * 1000:.1f} ms, "
            f"p99 {percentile(refreshes, 99) * 1000:.1f} ms"
        )
    print(
        f"API peak RSS {results['api_rss_mb']:.0f} MB; CPU while watched: API {results['api_cpu_s']:.1f}s of"
        f" {SECONDS:g}s; the watchers' process {results['watchers_cpu_s']:.1f}s in all"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--watchers", type=int, default=500)
    parser.add_argument("--consoles", type=int, help="list-level streams (/ops/events) instead of per-job ones")
    parser.add_argument("--open-streams", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--cookie", help=argparse.SUPPRESS)
    parser.add_argument("job_ids", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.open_streams:
        asyncio.run(open_streams(args.url, args.job_ids, args.open_streams, args.cookie))
    else:
        print_report(asyncio.run(main(args.consoles or args.watchers, args.consoles is not None)))
