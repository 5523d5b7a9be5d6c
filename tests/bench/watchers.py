"""`python -m tests.bench.watchers [--watchers 500]`: do many live-event watchers slow the API's other requests?

Runs the API and a worker as processes (the benchmark's own database and Redis db), keeps 20 jobs running, and
measures `GET /ops/jobs/{id}` at a steady rate, first alone, then with N Server-Sent-Event streams open on those
jobs. Also reports how late the watchers received each event (receive time minus the event's `created_at`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import datetime
from pathlib import Path

import httpx
from redis.asyncio import Redis

from service.settings import DEV_API_KEY
from tests.bench.load import HttpClient, open_loop, percentile
from tests.bench.stack import make_stack, prepare, start_api, start_worker, stop, wait_api, wait_worker

JOBS = 20
RATE = 100.0
SECONDS = 10.0


async def _watch(client: httpx.AsyncClient, job_id: str, delays: list[float], opened: asyncio.Event) -> None:
    async with client.stream("GET", f"/ops/jobs/{job_id}/events") as response:
        opened_at = time.time()
        opened.set()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                created = datetime.fromisoformat(json.loads(line[6:])["created_at"]).timestamp()
                if created >= opened_at:  # the history before it is replayed, not delivered live
                    delays.append(time.time() - created)


async def _reads(stack_port: int, job_ids: list[str]) -> tuple[float, float]:
    http = HttpClient("127.0.0.1", stack_port, DEV_API_KEY, size=16)
    calls = iter(range(10**9))
    try:
        run = await open_loop(RATE, SECONDS, lambda: http.request("GET", f"/ops/jobs/{job_ids[next(calls) % JOBS]}"))
    finally:
        http.close()
    return run.p(50) * 1000, run.p(99) * 1000


async def main(watchers: int) -> None:
    stack = make_stack(Path("var/bench-logs"))
    await prepare(stack)
    procs = [start_api(stack), start_worker(stack, 1)]
    try:
        await wait_api(stack, procs[0])
        redis = Redis.from_url(stack.redis_url)
        await wait_worker(redis, procs[1], floor=False)
        await redis.aclose()
        limits = httpx.Limits(max_connections=watchers + 50, max_keepalive_connections=watchers + 50)
        async with httpx.AsyncClient(
            base_url=stack.api_url, headers={"X-API-Key": DEV_API_KEY}, limits=limits, timeout=None
        ) as client:
            job_ids = [
                (await client.post("/ops/jobs/noop", json={"steps": 20, "sleep_s": 2})).json()["job_id"]
                for _ in range(JOBS)
            ]
            await asyncio.sleep(2)  # every job claimed and running
            alone = await _reads(stack.api_port, job_ids)
            delays: list[float] = []
            opened = [asyncio.Event() for _ in range(watchers)]
            streams = [
                asyncio.create_task(_watch(client, job_ids[i % JOBS], delays, opened[i])) for i in range(watchers)
            ]
            await asyncio.gather(*(event.wait() for event in opened))
            api_cpu, own_cpu = procs[0].cpu_s(), time.process_time()
            watched = await _reads(stack.api_port, job_ids)
            api_cpu, own_cpu = procs[0].cpu_s() - api_cpu, time.process_time() - own_cpu
            for stream in streams:
                stream.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        rss_mb = procs[0].memory_kb()[0] / 1024
    finally:
        stop(procs)
    print(f"GET /ops/jobs/{{id}} at {RATE:g}/s for {SECONDS:g}s, {JOBS} jobs running:")
    print(f"  alone:              p50 {alone[0]:.1f} ms  p99 {alone[1]:.1f} ms")
    print(f"  with {watchers} watchers: p50 {watched[0]:.1f} ms  p99 {watched[1]:.1f} ms")
    print(f"  ratio p50 {watched[0] / alone[0]:.2f}x  p99 {watched[1] / alone[1]:.2f}x")
    if delays:
        print(
            f"events delivered to watchers: {len(delays)}; delay p50 {percentile(delays, 50) * 1000:.0f} ms, "
            f"p99 {percentile(delays, 99) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms"
        )
    print(
        f"API peak RSS {rss_mb:.0f} MB; CPU while watched: API {api_cpu:.1f}s, "
        f"this client {own_cpu:.1f}s of {SECONDS:g}s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--watchers", type=int, default=500)
    asyncio.run(main(parser.parse_args().watchers))
