"""pg-rebuild asks Patroni where the profile has it: a member Patroni is already re-cloning is refused, another
replica not streaming within the lag limit is refused, the rebuilt member is waited for until it streams within
`max_lag_bytes`; where Patroni does not answer, the job says so and goes by labels, as before."""

from __future__ import annotations

import httpx
import pytest

from jobs.pg_rebuild import PgRebuildSettings
from service.settings import Settings
from tests.conftest import kube_registry, running_worker, wait_for, wait_for_status
from tests.kube_sim import KubeSim
from tests.test_pg_rebuild import STEPS, rebuild, steps, submit, world

MIB = 1024 * 1024


def patroni_state(sim: KubeSim, pod: str) -> str | None:
    return next((m["state"] for m in sim.patroni.cluster_json("db", "pg")["members"] if m["name"] == pod), None)


@pytest.mark.parametrize(
    ("setup", "refusal"),
    [
        (
            "recloning",
            "pod pg-1 is already re-cloning (Patroni: creating replica); a second re-clone would race the first",
        ),
        (
            "lagging",
            "other members not streaming: pg-2 lags 5242880 bytes behind the leader, more than max_lag_bytes 1048576; "
            "rebuilding pg-1 now could leave the cluster without a replica",
        ),
    ],
)
async def test_what_patroni_shows_unsafe_is_refused_and_nothing_deleted(
    client: httpx.AsyncClient,
    settings: Settings,
    kube_settings: PgRebuildSettings,
    kube_sim: KubeSim,
    setup: str,
    refusal: str,
) -> None:
    if setup == "recloning":  # the target: two overlapping re-clones have wiped a data directory upstream
        kube_sim.recloning("pg-1")
        await kube_sim.wait_for(lambda: patroni_state(kube_sim, "pg-1") == "creating replica")
    else:  # another replica, which would be the only one left while pg-1 re-clones
        kube_sim.lag("pg-2", 5 * MIB)
    before = world(kube_sim)

    job = await rebuild(client, settings, kube_settings)

    assert job["status"] == "failed"
    assert steps(job)["check-cluster-health"]["detail"] == f"error: Refused: {refusal}"
    assert world(kube_sim) == before


async def test_the_rebuilt_member_is_waited_for_until_it_streams_within_the_lag_limit(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    kube_sim.lag("pg-1", 5 * MIB)  # Patroni's state outlives the pod: the new member starts this far behind
    async with running_worker(settings, kube_registry(kube_settings)):
        job_id = await submit(client)

        async def lagging() -> bool:
            step = steps((await client.get(f"/ops/jobs/{job_id}")).json())["wait-ready"]
            return step["status"] == "running" and "more than max_lag_bytes 1048576" in (step["detail"] or "")

        await wait_for(lagging, within=15)
        assert kube_sim.pod("pg-1") is not None and kube_sim.profile.role_of(kube_sim.pod("pg-1") or {}) == "replica"
        kube_sim.lag("pg-1", 4096)  # caught up, within the limit
        job = await wait_for_status(client, job_id, "success", "failed", within=15)

    assert job["status"] == "success", job
    assert (
        steps(job)["wait-ready"]["detail"]
        .split(", after ")[0]
        .endswith("Ready as replica, streaming from pg-0 (timeline 1, lag 4096 B)")
    )


async def test_where_patroni_does_not_answer_the_job_says_so_and_goes_by_labels(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    proxy = kube_sim.fail(503, resource="pods/proxy", times=None, message="error trying to reach service")
    kube_sim.lag("pg-1", 5 * MIB)  # unseen without Patroni: the job cannot wait for it

    job = await rebuild(client, settings, kube_settings)

    assert job["status"] == "success", job
    assert [s["status"] for s in job["steps"]] == ["success"] * len(STEPS)
    labels_only = "labels only: Patroni did not answer (Kubernetes API HTTP 503: error trying to reach service)"
    assert steps(job)["check-cluster-health"]["detail"].endswith(f"pg-1 is replica; {labels_only}")
    assert f"Ready as replica, {labels_only}, after " in steps(job)["wait-ready"]["detail"]
    assert proxy.hits == 3, "asked once, at the health check, each member in turn; never again"
