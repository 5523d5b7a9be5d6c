"""`python -m tests.bench [--quick] [--out FILE.json]`: measure the service against the floor of its stack.

Order of the run (each side on an otherwise idle stack; the other side's processes are stopped):
1. the API alone: submissions at concurrency 32 (then cancelled and dropped from the queue);
2. one worker: pickups one job at a time; two workers: pickups under a steady load of half the service's own
   2-worker throughput (one batch end to end sets it); `GET /ops/jobs/{id}` at 200/s;
3. memory: the API's and the workers' RSS after the first and the second half of 10,000 more jobs;
4. the floor, steps 1-2 again with asyncpg + arq, at the same load;
5. end to end, for the reported figures: batches of the service and of the floor in turn (each with its own
   workers started for it), so that both meet the same state of the machine, which drifts by 10-15% over minutes;
6. a million jobs of history, then list pages (first and deep, with and without a filter) for both, and the
   console's jobs page (server-rendered HTML with its counts by status) for the service.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from arq.connections import ArqRedis, RedisSettings, create_pool
from rich.console import Console

from service.settings import DEV_API_KEY, get_settings
from tests.bench import scenarios, seed
from tests.bench.floor import FloorClient
from tests.bench.load import CpuMeter, HttpClient
from tests.bench.report import figures, print_report, targets, write_json
from tests.bench.stack import (
    FLOOR_QUEUE,
    Proc,
    Stack,
    checkpoint,
    console_session,
    make_stack,
    prepare,
    start_api,
    start_floor_worker,
    start_worker,
    stop,
    wait_api,
    wait_worker,
)

LOGS = Path("var/bench-logs")


@dataclass(frozen=True)
class Sizes:
    submits: int
    idle_pickups: int
    batch: int
    loaded_s: float
    read_rate: float
    read_s: float
    memory_jobs: tuple[int, int]
    seed_rows: int
    deep_offset: int
    list_repeats: int
    warmup: int
    # End-to-end batches per side and figure, in turn with the other side's; the median is reported.
    batch_repeats: int


FULL = Sizes(5000, 50, 2000, 10, 200, 10, (5000, 10000), 1_000_000, 500_000, 200, 50, 3)
QUICK = Sizes(500, 10, 200, 3, 200, 3, (1000, 2000), 100_000, 50_000, 30, 20, 1)

_started = time.monotonic()


def say(message: str) -> None:
    print(f"bench {time.monotonic() - _started:6.1f}s: {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, sizes: Sizes, stack: Stack) -> None:
        self.sizes = sizes
        self.stack = stack
        self.procs: list[Proc] = []
        self.results: dict[str, Any] = {"service": {}, "floor": {}, "cpu": {}}

    async def run(self) -> dict[str, Any]:
        say(f"preparing database apiops_bench and Redis {self.stack.redis_url} (logs in {self.stack.logs})")
        await prepare(self.stack)
        db = await asyncpg.connect(self.stack.dsn)
        # The floor's client holds as many connections as the service's API does.
        pool = await asyncpg.create_pool(self.stack.dsn, min_size=1, max_size=get_settings().db_pool_size)
        redis = await create_pool(RedisSettings.from_dsn(self.stack.redis_url), default_queue_name=FLOOR_QUEUE)
        http = HttpClient("127.0.0.1", self.stack.api_port, DEV_API_KEY, scenarios.CONCURRENCY)
        try:
            api = self._started(start_api(self.stack))
            await wait_api(self.stack, api)
            service = scenarios.ServiceSide(http)
            await self.jobs(service, db, redis, api)
            await self.memory(service, db, redis, api)
            floor = scenarios.FloorSide(FloorClient(pool, redis))
            await self.jobs(floor, db, redis, None)
            await self.end_to_end([service, floor], db, redis, api)
            await self.lists(db, [service, floor])
        finally:
            http.close()
            stop(self.procs)
            await redis.aclose()
            await pool.close()
            await db.close()
        return self.results

    def _started(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    async def _worker(self, side: scenarios.Side, redis: ArqRedis, number: int) -> Proc:
        floor = side.name == "floor"
        proc = self._started((start_floor_worker if floor else start_worker)(self.stack, number))
        await wait_worker(redis, proc, floor)
        return proc

    async def jobs(self, side: scenarios.Side, db: asyncpg.Connection, redis: ArqRedis, api: Proc | None) -> None:
        sizes, out, cpu = self.sizes, self.results[side.name], self.results["cpu"]
        meter = CpuMeter(api)
        say(f"{side.name}: {sizes.submits:,} submissions at concurrency {scenarios.CONCURRENCY}, no worker")
        with meter.measure() as spent:
            out["submit"] = await scenarios.submit_only(side, db, sizes.submits)
        cpu[f"{side.name} submit"] = spent
        await redis.flushdb()  # the cancelled jobs' deliveries; no worker runs now
        meter.workers.append(await self._worker(side, redis, 1))
        await scenarios.batch(side, db, sizes.warmup)
        say(f"{side.name}: {sizes.idle_pickups} pickups one at a time, 1 worker")
        out["pickup_idle"] = await scenarios.idle_pickups(side, db, sizes.idle_pickups)
        meter.workers.append(await self._worker(side, redis, 2))
        await scenarios.batch(side, db, sizes.warmup)
        if side.name == "service":
            # Only to set the load of the pickups below (end_to_end() takes the reported figures).
            say(f"service: {sizes.batch:,} jobs end to end, 2 workers, for the load of the next pickups")
            out["calibration_2w"] = await scenarios.batch(side, db, sizes.batch)
        # Both sides get the same load: half of what the service did with two workers.
        rate = round(self.results["service"]["calibration_2w"]["jobs_per_s"] / 2, 1)
        say(f"{side.name}: pickups under {rate:g} jobs/s for {sizes.loaded_s:g}s, 2 workers")
        meter = CpuMeter(api, meter.workers)
        with meter.measure() as spent:
            out["pickup_load"] = await scenarios.loaded_pickups(side, db, rate, sizes.loaded_s)
        cpu[f"{side.name} pickup under load"] = spent
        ids = [row["job_id"] for row in await db.fetch("SELECT job_id FROM ops_job ORDER BY random() LIMIT 5000")]
        say(f"{side.name}: reads of single jobs at {sizes.read_rate:g}/s for {sizes.read_s:g}s")
        meter = CpuMeter(api, meter.workers)
        with meter.measure() as spent:
            out["read"] = await scenarios.reads(side, ids, sizes.read_rate, sizes.read_s)
        cpu[f"{side.name} read"] = spent
        if side.name == "floor":
            out["memory"] = {"worker_peak_mb": round(max(w.memory_kb()[0] for w in meter.workers) / 1024, 1)}
            stop(meter.workers)

    async def end_to_end(self, sides: list[scenarios.Side], db: asyncpg.Connection, redis: ArqRedis, api: Proc) -> None:
        """Each side's batches with 1, then 2 workers, in turn with the other side's: the median of each side's
        `batch_repeats` batches is reported, with every batch's rate and the CPU of the median one."""
        sizes = self.sizes
        await checkpoint(db)
        for workers in (1, 2):
            runs: dict[str, list[tuple[dict[str, Any], dict[str, float]]]] = {side.name: [] for side in sides}
            for repeat in range(1, sizes.batch_repeats + 1):
                for side in sides:
                    say(f"{side.name}: {sizes.batch:,} jobs end to end, {workers} worker(s), {repeat} of "
                        f"{sizes.batch_repeats}")  # fmt: skip
                    procs = [await self._worker(side, redis, number) for number in range(1, workers + 1)]
                    await scenarios.batch(side, db, sizes.warmup)
                    meter = CpuMeter(api if side.name == "service" else None, procs)
                    with meter.measure() as spent:
                        runs[side.name].append((await scenarios.batch(side, db, sizes.batch), spent))
                    stop(procs)
            for side in sides:
                ordered = sorted(runs[side.name], key=lambda run: run[0]["jobs_per_s"])
                median, spent = ordered[len(ordered) // 2]
                rates = [run["jobs_per_s"] for run, _ in runs[side.name]]
                self.results[side.name][f"end_to_end_{workers}w"] = {**median, "runs_jobs_per_s": rates}
                self.results["cpu"][f"{side.name} end to end {workers}w"] = spent

    async def memory(self, side: scenarios.Side, db: asyncpg.Connection, redis: ArqRedis, api: Proc) -> None:
        """RSS of the API and the workers after each half of `memory_jobs` more jobs; then the workers stop."""
        workers = [proc for proc in self.procs if proc.name.startswith("worker-")]
        done, samples = 0, []
        for count in self.sizes.memory_jobs:
            say(f"service: memory after {count:,} more jobs")
            await scenarios.batch(side, db, count - done)
            done = count
            samples.append((api.memory_kb(), [w.memory_kb() for w in workers]))
        (_, api_first), (api_peak, api_last) = samples[0][0], samples[1][0]
        worker_first = max(rss for _, rss in samples[0][1])
        worker_last = max(rss for _, rss in samples[1][1])
        self.results["service"]["memory"] = {
            "jobs": list(self.sizes.memory_jobs),
            "api_peak_mb": round(api_peak / 1024, 1),
            "api_rss_mb": [round(api_first / 1024, 1), round(api_last / 1024, 1)],
            "api_growth_pct": round((api_last - api_first) / api_first * 100, 1),
            "worker_peak_mb": round(max(hwm for hwm, _ in samples[1][1]) / 1024, 1),
            "worker_rss_mb": [round(worker_first / 1024, 1), round(worker_last / 1024, 1)],
            "worker_growth_pct": round((worker_last - worker_first) / worker_first * 100, 1),
        }
        stop(workers)

    async def lists(self, db: asyncpg.Connection, sides: list[scenarios.Side]) -> None:
        sizes = self.sizes
        say(f"seeding {sizes.seed_rows:,} finished jobs")
        seconds = await seed.seed(db, sizes.seed_rows, say)
        total = await db.fetchval("SELECT count(*) FROM ops_job")
        self.results["seed"] = {"rows": total, "seconds": round(seconds, 1)}
        cases = await seed.list_cases(db, sizes.deep_offset)
        for side in sides:
            say(f"{side.name}: list pages, {sizes.list_repeats} requests each")
            self.results[side.name]["lists"] = {
                case.name: await scenarios.list_pages(side, case, sizes.list_repeats) for case in cases
            }
        deep = cases[1].cursor
        assert deep is not None
        say(f"service: the console's jobs page, {sizes.list_repeats} requests each")
        http = HttpClient(
            "127.0.0.1", self.stack.api_port, DEV_API_KEY, size=1, cookie=await console_session(self.stack.api_url)
        )
        try:
            self.results["service"]["console"] = {
                case.name: await scenarios.console_pages(http, case, sizes.list_repeats)
                for case in scenarios.console_cases(deep)
            }
        finally:
            http.close()


def machine() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
    return {
        "cpus": len(Path("/proc/cpuinfo").read_text().split("processor")) - 1,
        "memory_gib": round(int(meminfo[1]) / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


async def main_async(sizes: Sizes, out: Path, quick: bool, console: Console) -> int:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM stops the run as Ctrl-C does: the finally blocks stop every process started.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    started = datetime.now(UTC)
    bench = Bench(sizes, make_stack(LOGS))
    results = await bench.run()
    results = {
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        "mode": "quick" if quick else "full",
        "command": "python -m tests.bench" + (" --quick" if quick else "") + f" --out {out}",
        "machine": machine(),
        "sizes": asdict(sizes),
        **results,
    }
    found = figures(results)
    checked = targets(found)
    print_report(found, checked, console)
    write_json(out, results, found, checked)
    say(f"wrote {out}")
    # The run itself succeeded: missed targets are reported (FAIL lines, and in the JSON), not an error.
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a much smaller run, for a smoke check")
    parser.add_argument("--out", type=Path, default=Path("var/bench.json"), help="where to write every figure")
    args = parser.parse_args()
    # Piped or redirected, rich would wrap the table at 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 150)
    try:
        return asyncio.run(main_async(QUICK if args.quick else FULL, args.out, args.quick, console))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted; every process started was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
