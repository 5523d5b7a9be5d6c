"""Scaled out over machines: two API processes and three workers, each on a test host of its own (a network
namespace, tests/netns.py) that reaches PostgreSQL and Redis over its own link, started as an operator starts them
(`apiops serve`, `arq jobs.worker.WorkerSettings`). Jobs go in through either API and are watched live through the
other; a worker host that is lost (off the network, then every process in it killed) has its jobs finished by the
other hosts, without a finished step running again.

Needs root (network namespaces); skipped, saying why, where they cannot be made. Alone:
`.venv/bin/pytest tests/test_scale_out.py -rP` (`-rP` also prints the figures measured).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from service.cli.client import ApiClient, JobEvent
from service.settings import Settings
from tests.conftest import KEYS, headers, job_summary, key_entries, read_job, wait_for, wait_for_status
from tests.netns import Host, Network
from tests.processes import worker_env

# What an operator runs on each machine (docs/operations.md, "Running it").
SERVE = (str(Path(sys.executable).with_name("apiops")), "serve")
WORK = (sys.executable, "-m", "arq", "jobs.worker.WorkerSettings")
API_PORT = 8080
WORKERS = ("worker-1", "worker-2", "worker-3")
# A lost host's jobs wait for their leases to expire: 10 s by default, shortened here.
LEASE_TTL_S = 3.0
REAPER_INTERVAL_S = 0.5
HOST_SETTINGS: dict[str, Any] = {"db_pool_size": 3}  # five processes on a PostgreSQL that others share
WORKER_SETTINGS: dict[str, Any] = {
    "lease_ttl_s": LEASE_TTL_S,
    "reaper_interval_s": REAPER_INTERVAL_S,
    "worker_max_jobs": 2,  # few enough that a handful of jobs needs every worker
}
START_WITHIN_S = 40.0  # five Python processes starting at once on a small, busy machine


@dataclass
class Deployment:
    api_hosts: list[Host]
    apis: list[httpx.AsyncClient]  # one per API host, with a key that may read and write jobs
    workers: dict[str, Host]  # by hostname
    watches: list[Watch] = field(default_factory=list)

    def watch(self, n: int, job_id: str) -> Watch:
        """The job's events, followed through API `n` from now on."""
        watch = Watch(f"http://{self.api_hosts[n].ip}:{API_PORT}", job_id)
        self.watches.append(watch)
        return watch

    def check_running(self) -> None:
        for host in [*self.api_hosts, *self.workers.values()]:
            for process in host.processes:
                if process.returncode is not None and not host.killed:
                    raise AssertionError(f"{host.name}: its process exited with code {process.returncode}")


async def _env(net: Network, on: Host, settings: Settings, **overrides: Any) -> dict[str, str]:
    """A process's environment on host `on`: the test's database and Redis db index, through forwarders of its own."""
    db = make_url(settings.database_url.get_secret_value())
    redis = urlsplit(settings.redis_url.get_secret_value())
    to_db = await net.forward(on, db.port or 5432, db.host or "127.0.0.1")
    to_redis = await net.forward(on, redis.port or 6379, redis.hostname or "127.0.0.1")
    through = settings.model_copy(
        update={
            "database_url": SecretStr(db.set(host=on.gateway, port=to_db.port).render_as_string(False)),
            "redis_url": SecretStr(redis._replace(netloc=f"{on.gateway}:{to_redis.port}").geturl()),
        }
    )
    return worker_env(through, **HOST_SETTINGS, **overrides)


@pytest.fixture
async def deployment(settings: Settings) -> AsyncIterator[Deployment]:
    async with Network.create() as net, AsyncExitStack() as clients:
        api_hosts = [await net.host(name) for name in ("api-1", "api-2")]
        workers = {name: await net.host(name) for name in WORKERS}
        keys = "[" + ",".join(k.model_dump_json() for k in key_entries()) + "]"
        for host in api_hosts:
            await host.start(*SERVE, env=await _env(net, host, settings, host=host.ip, port=API_PORT, api_keys=keys))
        for host in workers.values():
            await host.start(*WORK, env=await _env(net, host, settings, **WORKER_SETTINGS))
        apis = [
            await clients.enter_async_context(
                httpx.AsyncClient(base_url=f"http://{host.ip}:{API_PORT}", headers=headers("writer"), timeout=10)
            )
            for host in api_hosts
        ]
        deployment = Deployment(api_hosts, apis, workers)
        try:
            await _started(deployment)
            yield deployment
        finally:
            for watch in deployment.watches:
                await watch.stop()


async def _started(deployment: Deployment) -> None:
    """Both APIs ready (PostgreSQL and Redis answer them) and every worker's heartbeat seen through each."""

    async def probe() -> list[set[str]]:
        deployment.check_running()
        seen = []
        for api in deployment.apis:
            try:
                if (await api.get("/readyz")).status_code != 200:
                    return []
                seen.append({w["host"] for w in (await api.get("/ops/workers")).json()["workers"]})
            except httpx.TransportError:
                return []
        return seen

    await wait_for(probe, within=START_WITHIN_S, interval=0.1, until=lambda seen: seen == [set(WORKERS)] * 2)


class Watch:
    """`GET /ops/jobs/{id}/events` followed through one API, in the background, by the client `apiops watch` uses:
    every event, with the time it arrived, until the job's end."""

    def __init__(self, url: str, job_id: str) -> None:
        self.seen: list[tuple[JobEvent, float]] = []
        self.opened = time.time()
        self._task = asyncio.create_task(self._follow(url, job_id))

    async def _follow(self, url: str, job_id: str) -> None:
        async with ApiClient(url, KEYS["writer"][0]) as client:
            async for event in client.follow(job_id):
                self.seen.append((event, time.time()))

    async def first(self, check: Callable[[JobEvent], bool], within: float) -> tuple[JobEvent, float]:
        async def probe() -> tuple[JobEvent, float] | None:
            found = next(((e, t) for e, t in self.seen if check(e)), None)
            if found is None and self._task.done():
                self._task.result()  # the watcher's own error, if it ended on one
                raise AssertionError(f"the stream ended without it: {[e.kind for e, _ in self.seen]}")
            return found

        found: tuple[JobEvent, float] = await wait_for(probe, within, show=lambda _: str([e for e, _ in self.seen]))
        return found

    async def to_the_end(self, within: float = 30) -> list[tuple[JobEvent, float]]:
        async with asyncio.timeout(within):
            await self._task
        return self.seen

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def delays(self) -> list[float]:
        """Seconds from each event's write (its `created_at`: PostgreSQL's clock, on this machine) to its arrival here,
        for the events written while watching."""
        return [t - e.created_at.timestamp() for e, t in self.seen if e.created_at.timestamp() > self.opened]


def host_of(actor: str | None) -> str:
    """`worker:<hostname>:<pid>:<random>` -> hostname."""
    assert actor is not None and actor.startswith("worker:"), actor
    return actor.split(":")[1]


async def history(api: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = (await api.get(f"/ops/jobs/{job_id}", params={"include": "events"})).json()["events"]
    return events


def claims(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "claimed"]


async def test_jobs_go_in_through_either_api_run_on_every_worker_and_are_watched_live_through_the_other(
    deployment: Deployment,
) -> None:
    d = deployment
    job_ids: list[str] = []
    watches: list[Watch] = []
    for n in range(6):
        api, other = d.apis[n % 2], d.apis[1 - n % 2]
        response = await api.post("/ops/jobs/noop", json={"steps": 3, "sleep_s": 0.5})
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["source_ip"] == d.api_hosts[n % 2].gateway, "the request came over that API host's link"
        assert (await read_job(other, job["job_id"]))["job_id"] == job["job_id"], "the other API knows it at once"
        job_ids.append(job["job_id"])
        if n == 0:  # submitted through API 1, watched through API 2 and through API 1 itself
            watches = [d.watch(1, job["job_id"]), d.watch(0, job["job_id"])]

    for n, job_id in enumerate(job_ids):
        job = await wait_for_status(d.apis[1 - n % 2], job_id, "success", "failed", within=30)
        assert job["status"] == "success", job_summary(job)
    histories = [await history(d.apis[0], job_id) for job_id in job_ids]
    ran_on = Counter(host_of(claim["actor"]) for events in histories for claim in claims(events))
    assert set(ran_on) == set(WORKERS), f"jobs per worker host: {dict(ran_on)}"

    through_other, through_same = [await w.to_the_end() for w in watches]
    recorded = await history(d.apis[1], job_ids[0])
    assert [e.event_id for e, _ in through_other] == [e["event_id"] for e in recorded]
    assert [e.event_id for e, _ in through_same] == [e["event_id"] for e in recorded]
    # Live, not replayed at the end: step-1's end reached the other API's watcher before the job ended.
    done = {(e.kind, e.step, e.status): (e, t) for e, t in through_other}
    step_1_seen_at = done[("step", "step-1", "success")][1]
    assert step_1_seen_at < done[("finished", None, "success")][0].created_at.timestamp()
    across, same = watches[0].delays(), watches[1].delays()
    print(
        f"event delay, write to watcher, through the other API: median {median(across) * 1000:.0f} ms, "
        f"max {max(across) * 1000:.0f} ms ({len(across)} events); through the same API: median "
        f"{median(same) * 1000:.0f} ms, max {max(same) * 1000:.0f} ms; jobs per worker host: {dict(ran_on)}"
    )


async def test_jobs_of_a_lost_worker_host_are_finished_by_the_other_hosts_and_no_finished_step_runs_again(
    deployment: Deployment,
) -> None:
    d = deployment
    job_ids = [(await api.post("/ops/jobs/noop", json={"steps": 3, "sleep_s": 1.5})).json()["job_id"] for api in d.apis]
    watch = d.watch(1, job_ids[0])  # submitted through API 1, watched through API 2
    await watch.first(lambda e: e.kind == "step" and e.step == "step-2" and e.status == "running", within=15)
    owners = {job_id: [c["actor"] for c in claims(await history(d.apis[0], job_id))] for job_id in job_ids}
    lost = host_of(owners[job_ids[0]][-1])
    held = [job_id for job_id, owner in owners.items() if owner and host_of(owner[-1]) == lost]

    lost_at = time.time()
    await d.workers[lost].lose()
    taken_over, seen_at = await watch.first(lambda e: e.kind == "claimed" and e.attempt == 2, within=LEASE_TTL_S + 15)
    resumed_after = taken_over.created_at.timestamp() - lost_at
    for job_id in job_ids:
        job = await wait_for_status(d.apis[0], job_id, "success", "failed", within=30)
        assert job["status"] == "success", job_summary(job)
        events = await history(d.apis[1], job_id)
        successes = Counter(e["step"] for e in events if e["kind"] == "step" and e["status"] == "success")
        assert successes == {"step-1": 1, "step-2": 1, "step-3": 1}, f"{job_id}: each step succeeded once"
        if job_id not in held:
            assert job["attempt"] == 1, job_summary(job)
            continue
        assert job["attempt"] == 2, job_summary(job)
        # A reaper noticed the expired lease and delivered the job again; a worker of another host claimed it.
        lost_owner = owners[job_id][-1].removeprefix("worker:")
        assert any(e["kind"] == "redelivered" and lost_owner in e["detail"] for e in events), events
        new_owner = claims(events)[-1]
        assert host_of(new_owner["actor"]) in set(WORKERS) - {lost}
        assert f"took over from {lost_owner}, whose lease expired" in new_owner["detail"]

    assert [s["attempts"] for s in (await read_job(d.apis[1], job_ids[0]))["steps"]] == [1, 2, 1]
    assert resumed_after < LEASE_TTL_S + REAPER_INTERVAL_S + 5, f"resumed {resumed_after:.1f}s after the host was lost"
    watched, recorded = await watch.to_the_end(), await history(d.apis[1], job_ids[0])
    assert [e.event_id for e, _ in watched] == [e["event_id"] for e in recorded], "the watcher saw it all, live"
    print(
        f"{lost} lost holding {len(held)} job(s); resumed on {host_of(taken_over.actor)} {resumed_after:.2f}s later "
        f"(lease {LEASE_TTL_S:g}s, reaper every {REAPER_INTERVAL_S:g}s); the takeover reached the watcher on the "
        f"other API {(seen_at - taken_over.created_at.timestamp()) * 1000:.0f} ms after it was written"
    )
