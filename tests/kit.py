"""The job author's test kit: a job type end to end, on the real worker, against the simulated cluster.

    async def test_restarts_the_replica(job_kit: KitFactory) -> None:
        kit = await job_kit(MY_JOB, cluster=True)
        job_id = await kit.submit("my-job", namespace="db", pod="pg-1")
        job = await kit.run_to_end(job_id)
        assert job["status"] == "success", job

A pytest plugin, loaded by tests/conftest.py. A kit has the test's own PostgreSQL database and Redis db index, the
real API app (HTTP through ASGI) and the real arq worker (configured like `arq jobs.worker.WorkerSettings`), both
with only the job types under test in their registry; with `cluster=True` also `kit.cluster`, a `KubeSim` with its
fault injection, which the worker's settings name in their kubeconfig. `worker_dies_during` runs the job on a
worker process and SIGKILLs it in the middle of a step; another worker takes the job over once the lease expires.
Every wait is on the job's recorded state (conftest's `wait_for`) and fails saying what it saw last.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from pydantic_settings import BaseSettings

from jobs.pgkube.settings import KubeSettings
from service.jobtypes import JobType, Registry
from service.models import JobStatus
from service.settings import Settings
from tests import kit_worker
from tests.conftest import (
    api_client,
    headers,
    kube_settings_for,
    running_worker,
    shipped_role_cluster,
    submit,
    wait_for,
)
from tests.kube_sim import KubeSim
from tests.kube_sim.faults import Latency

Job = dict[str, Any]  # a job as GET /ops/jobs/{job_id} shows it

REPO = Path(__file__).resolve().parents[1]
# The reaper looks for expired leases this often in the kit's workers, so a takeover follows a death quickly.
REAPER_INTERVAL_S = 0.25
RUN_WITHIN_S = 30.0


@dataclass(frozen=True)
class Death:
    """What the job looked like when its worker was killed."""

    attempt: int
    step: str
    detail: str | None


class JobKit:
    def __init__(
        self, settings: Settings, registry: Registry, client: httpx.AsyncClient, cluster: KubeSim | None, work: Path
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.client = client  # the API, with a key that may read and write jobs
        self._cluster = cluster
        self._work = work
        self._worker: AsyncExitStack | None = None

    @property
    def cluster(self) -> KubeSim:
        """The simulated cluster: `sim.crash_loop("pg-1")`, `sim.fail(500, verb="delete")`, `sim.pod("pg-1")`..."""
        if self._cluster is None:
            raise RuntimeError("this kit has no cluster: ask for one with job_kit(..., cluster=True)")
        return self._cluster

    async def submit(self, job_type: str, **params: Any) -> str:
        """POST /ops/jobs/{job_type} with `params`, which must be accepted; the job id."""
        return await submit(self.client, job_type, **params)

    async def job(self, job_id: str) -> Job:
        response = await self.client.get(f"/ops/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: Job = response.json()
        return job

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's history (claimed, step, progress, released, finished, ...), oldest first."""
        response = await self.client.get(f"/ops/jobs/{job_id}", params={"include": "events"})
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["events"]
        return events

    async def run_to_end(self, job_id: str, within: float = RUN_WITHIN_S) -> Job:
        """Run the job on the kit's worker (started if none runs) until it has finished; the job as the API shows it."""
        await self.start_worker()
        return await self.until(job_id, lambda job: JobStatus(job["status"]).finished, "end", within)

    async def wait_for_step(
        self,
        job_id: str,
        step: str,
        *,
        detail: str | None = None,
        when: Callable[[], bool] | None = None,
        within: float = 15.0,
    ) -> Job:
        """Until `step` is running, its detail contains `detail` and `when()` holds (each when given); the job then."""

        def running(job: Job) -> bool:
            row = step_of(job, step)
            seen = detail is None or detail in (row["detail"] or "")
            return row["status"] == "running" and seen and (when is None or when())

        what = f"step {step} running" + (f" with {detail!r}" if detail else "") + (" and when()" if when else "")
        return await self.until(job_id, running, what, within)

    async def until(self, job_id: str, check: Callable[[Job], bool], what: str, within: float) -> Job:
        """Until `check(job)` holds; fails with the job as last seen."""
        last: Job = {}

        async def probe() -> Job | None:
            nonlocal last
            last = await self.job(job_id)
            return last if check(last) else None

        try:
            found: Job = await wait_for(probe, within=within)
        except TimeoutError:
            raise AssertionError(f"job {job_id}: no {what} within {within:g}s; last seen: {summary(last)}") from None
        return found

    async def start_worker(self) -> None:
        """The kit's in-process worker; it runs until `stop_worker` or the end of the test."""
        if self._worker is None:
            stack = AsyncExitStack()
            await stack.enter_async_context(running_worker(self.settings, self.registry))
            self._worker = stack

    async def stop_worker(self) -> None:
        """Stop the kit's worker as SIGTERM does: a running job is handed back, its step runs again later."""
        stack, self._worker = self._worker, None
        if stack is not None:
            await stack.aclose()

    @asynccontextmanager
    async def worker_dies_during(
        self,
        job_id: str,
        step: str,
        *,
        detail: str | None = None,
        when: Callable[[], bool] | None = None,
        within: float = RUN_WITHIN_S,
    ) -> AsyncIterator[Death]:
        """Run the job on a worker process until `step` is running, with `detail` and once `when()` holds (each when
        given; `when` may look at the cluster: `lambda: deletes.hits == 1`), then SIGKILL the worker.

        Inside the block the job is orphaned: `running`, its lease held by a dead worker. When the block ends, the
        kit's worker is started and the block waits until it has taken the job over (a new attempt, once the lease
        expired); `run_to_end` then waits for the end. Fails if the step ended before the worker died."""
        await self.stop_worker()  # the job must run on the worker that dies
        config = kit_worker.write(self._work / "kit-worker.pickle", self.settings, self.registry)
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.kit_worker", str(config), cwd=REPO)
        try:
            await self.wait_for_step(job_id, step, detail=detail, when=when, within=within)
        except AssertionError as exc:
            if process.returncode is not None:  # its output is in the test's captured stderr
                raise AssertionError(f"the worker process exited with code {process.returncode}: {exc}") from None
            raise
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()
        job = await self.job(job_id)
        at_death = step_of(job, step)
        if job["status"] != "running" or at_death["status"] != "running":
            raise AssertionError(
                f"step {step} ended before its worker died, so nothing was tested; hold it in place with a cluster "
                f"fault and pass `detail` or `when`: {summary(job)}"
            )
        death = Death(job["attempt"], step, at_death["detail"])
        yield death
        await self.start_worker()
        taken_over = self.settings.lease_ttl_s + within
        await self.until(job_id, lambda j: j["attempt"] > death.attempt, "takeover by another worker", taken_over)

    @asynccontextmanager
    async def worker_dies_with_request_in_flight(
        self, job_id: str, step: str, *, verb: str, resource: str, held_s: float = 1.0
    ) -> AsyncIterator[Latency]:
        """`worker_dies_during` at the worst moment of a step that changes the cluster: the cluster holds the first
        matching request `held_s` (it lands all the same, as on a real API server), and the worker dies once it has
        sent it, before the answer. Yields the rule that counts every matching request, so that a test can say the
        step that ran again sent none. Give the kit a lease longer than `held_s` (`lease_ttl_s=4`)."""
        self.cluster.slow(held_s, verb=verb, resource=resource, times=1)
        sent = self.cluster.slow(0, verb=verb, resource=resource)
        async with self.worker_dies_during(job_id, step, when=lambda: sent.hits == 1):
            yield sent


def step_of(job: Job, name: str) -> dict[str, Any]:
    for row in job["steps"]:
        if row["name"] == name:
            found: dict[str, Any] = row
            return found
    raise AssertionError(f"job {job['job_id']} has no step {name!r}: {[s['name'] for s in job['steps']]}")


def summary(job: Job) -> str:
    if not job:
        return "nothing yet"
    steps = "; ".join(f"{s['name']} {s['status']} x{s['attempts']}: {s['detail']}" for s in job["steps"])
    return f"{job['status']} (attempt {job['attempt']}, error {job['error']!r}) steps: {steps}"


class KitFactory(Protocol):
    async def __call__(
        self, *job_types: JobType[Any], cluster: bool = False, profile: str = "zalando", **settings: Any
    ) -> JobKit: ...


@pytest.fixture
async def job_kit(settings: Settings, tmp_path: Path) -> AsyncIterator[KitFactory]:
    """`kit = await job_kit(MY_JOB, cluster=True, **settings_overrides)`; everything it started ends with the test."""
    async with AsyncExitStack() as stack:

        async def make(
            *job_types: JobType[Any], cluster: bool = False, profile: str = "zalando", **overrides: Any
        ) -> JobKit:
            # Overrides of the service's settings go to Settings, the others to the job types' own settings.
            service = {k: v for k, v in overrides.items() if k in Settings.model_fields}
            kit_settings = settings.model_copy(update={"reaper_interval_s": REAPER_INTERVAL_S, **service})
            sim = None
            job_settings: dict[str, BaseSettings] = {}
            if cluster:
                sim = await stack.enter_async_context(shipped_role_cluster(profile))
                others = {k: v for k, v in overrides.items() if k not in service}
                kube = kube_settings_for(sim, tmp_path / "kubeconfig", **others)
                # Every job type whose settings reach Kubernetes reaches the simulated cluster.
                job_settings = {
                    t.name: t.settings.model_validate(kube.model_dump(include=set(t.settings.model_fields)))
                    for t in job_types
                    if t.settings is not None and issubclass(t.settings, KubeSettings)
                }
            registry = Registry(job_types, job_settings)
            client = await stack.enter_async_context(api_client(kit_settings, registry, headers=headers("writer")))
            kit = JobKit(kit_settings, registry, client, sim, tmp_path)
            stack.push_async_callback(kit.stop_worker)  # first of all: the worker stops before the cluster
            return kit

        yield make
