"""pg-restart on CloudNativePG (profile cnpg): the rolling restart asked as `kubectl cnpg restart` asks it (the
Cluster's restartedAt annotation) and carried out by the simulated operator, under the shipped worker Role. Each
instance restarted once, the primary last (in place, or after the operator's switchover); the refusals (nothing
asked); a crash-looping instance failing the job fast; a worker SIGKILLed while its patch is in flight; the dry run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs import pg_restart
from jobs.pgkube.cnpg import RESTART_ANNOTATION
from service.settings import Settings
from tests.conftest import kube_settings_for
from tests.conftest import step_details as details
from tests.kit import KitFactory, step_of
from tests.kube_sim import KubeSim
from tests.test_pg_restart import STEPS, restart
from tests.test_pg_switchover_cnpg import promotions

HEALTHY = "Cluster pg (Cluster in healthy state, primary pg-1, 3/3 ready)"


async def roll(client: httpx.AsyncClient, settings: Settings, sim: KubeSim, tmp_path: Path, **params: Any) -> Any:
    return await restart(client, settings, kube_settings_for(sim, tmp_path / "kubeconfig"), profile="cnpg", **params)


def restarts(sim: KubeSim) -> list[tuple[str, str]]:
    return [(r.pod, r.role) for r in sim.cnpg_restarts]


def annotation(sim: KubeSim) -> str | None:
    return ((sim.cnpg_cluster() or {})["metadata"].get("annotations") or {}).get(RESTART_ANNOTATION)


async def test_a_rolling_restart_restarts_every_instance_once_and_the_primary_last_in_place(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    job = await roll(client, settings, cnpg_sim, tmp_path, method="in-place")

    assert job["status"] == "success", job
    assert [(s["name"], s["status"], s["attempts"]) for s in job["steps"]] == [(n, "success", 1) for n in STEPS]
    assert restarts(cnpg_sim) == [("pg-3", "replica"), ("pg-2", "replica"), ("pg-1", "primary")]
    assert promotions(cnpg_sim) == [] and cnpg_sim.primary() == "pg-1"
    assert (cnpg_sim.cnpg_cluster() or {})["status"]["phase"] == "Cluster in healthy state"
    assert annotation(cnpg_sim) == job["state"]["restart_asked"]
    assert job["state"]["restarted"] == ["pg-3", "pg-2", "pg-1"] and job["state"]["remaining"] == []
    detail = details(job)
    assert detail["read-topology"] == (
        "primary pg-1 on timeline 1; members: pg-1 (primary, Ready, healthy, timeline 1), "
        "pg-2 (replica, Ready, healthy, timeline 1), pg-3 (replica, Ready, healthy, timeline 1); "
        "restart order (CloudNativePG's): pg-3, pg-2, pg-1 (the primary, in place)"
    )
    assert detail["restart-replicas"] == (
        f"set {RESTART_ANNOTATION} on Cluster pg, as kubectl cnpg restart does ({job['state']['restart_asked']}); "
        "restarted pg-3, pg-2, one at a time, each back Ready and healthy"
    )
    assert detail["switchover"] == (
        "no switchover: the Cluster's primaryUpdateMethod is restart: the operator restarts pg-1 in place"
    )
    assert detail["restart-primary"] == (
        f"restarted pg-3, pg-2, pg-1; {HEALTHY}; every instance restarted once: pg-3, pg-2, pg-1"
    )


async def test_with_primary_update_method_switchover_the_operator_switches_over_before_the_former_primary_restarts(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    cnpg_sim.cnpg_spec(primaryUpdateMethod="switchover")

    job = await roll(client, settings, cnpg_sim, tmp_path)

    assert job["status"] == "success", job
    assert restarts(cnpg_sim) == [("pg-3", "replica"), ("pg-2", "replica"), ("pg-1", "replica")]
    assert promotions(cnpg_sim) == [("pg-1", "pg-2", 2)]
    detail = details(job)
    # Then the operator restarts pg-1 at once: what the Cluster says next to it depends on when the job looked.
    assert detail["switchover"].startswith("the operator switched over to pg-2 on timeline 2 (was pg-1 on timeline 1)")
    assert detail["restart-primary"].endswith("every instance restarted once: pg-3, pg-2, pg-1")


@pytest.mark.parametrize(
    ("params", "spec", "refusal"),
    [
        (
            {"method": "switchover"},
            {},
            "Cluster pg has primaryUpdateMethod restart, which a restart cannot override: ask with method in-place, "
            "or set primaryUpdateMethod switchover on the Cluster",
        ),
        (
            {"method": "in-place"},
            {"primaryUpdateMethod": "switchover"},
            "Cluster pg has primaryUpdateMethod switchover, which a restart cannot override: ask with method "
            "switchover, or set primaryUpdateMethod restart on the Cluster",
        ),
        (
            {"method": "in-place"},
            {"primaryUpdateStrategy": "supervised"},
            "Cluster pg has primaryUpdateStrategy supervised: its operator would wait for someone to switch over or "
            "restart the primary; set it to unsupervised for a rolling restart",
        ),
    ],
)
async def test_a_restart_the_operator_would_not_carry_out_as_asked_is_refused_and_nothing_asked(
    client: httpx.AsyncClient,
    settings: Settings,
    cnpg_sim: KubeSim,
    tmp_path: Path,
    params: dict[str, str],
    spec: dict[str, str],
    refusal: str,
) -> None:
    cnpg_sim.cnpg_spec(**spec)

    job = await roll(client, settings, cnpg_sim, tmp_path, **params)

    assert job["status"] == "failed"
    assert details(job)["read-topology"] == f"error: Refused: {refusal}"
    assert annotation(cnpg_sim) is None and restarts(cnpg_sim) == []


async def test_an_unhealthy_cluster_is_refused_and_nothing_asked(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    cnpg_sim.not_ready("pg-3")
    await cnpg_sim.wait_for(lambda: (cnpg_sim.cnpg_cluster() or {})["status"]["phase"] != "Cluster in healthy state")

    job = await roll(client, settings, cnpg_sim, tmp_path, method="in-place")

    assert job["status"] == "failed"
    assert details(job)["read-topology"] == (
        "error: Refused: Cluster pg (Waiting for the instances to become active, primary pg-1, 2/3 ready) is not "
        "healthy: Waiting for pg-3"
    )
    assert annotation(cnpg_sim) is None and restarts(cnpg_sim) == []


async def test_only_pending_restart_is_refused_at_submission(client: httpx.AsyncClient) -> None:
    body = {"namespace": "db", "cluster": "pg", "profile": "cnpg", "only_pending_restart": True}
    response = await client.post("/ops/jobs/pg-restart", json=body)

    assert response.status_code == 422, response.text
    assert "only_pending_restart needs Patroni's pending_restart flag" in response.text


async def test_a_crash_looping_instance_fails_the_job_fast(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    cnpg_sim.crash_loop("pg-2")  # the running pod is not touched: its recreation crash-loops

    job = await roll(client, settings, cnpg_sim, tmp_path, method="in-place")

    assert job["status"] == "failed", job
    step = step_of(job, "restart-replicas")
    assert step["attempts"] == 1
    assert "pod pg-2 container postgres: CrashLoopBackOff" in step["detail"], step
    assert restarts(cnpg_sim) == [("pg-3", "replica"), ("pg-2", "replica")], "the operator holds the rollout there"
    assert job["state"]["restarted"] == ["pg-3"] and job["state"]["in_progress"] == "pg-2"
    assert job["state"]["remaining"] == ["pg-1"]


async def test_dry_run_checks_and_asks_nothing(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    job = await roll(client, settings, cnpg_sim, tmp_path, method="in-place", dry_run=True)

    assert job["status"] == "success", job
    detail = details(job)
    assert detail["restart-replicas"] == (
        f"dry run: would set {RESTART_ANNOTATION} on Cluster pg, as kubectl cnpg restart does; CloudNativePG's "
        "operator restarts the instances; no Patroni is asked"
    )
    assert detail["restart-primary"] == "dry run: the operator would restart pg-1 in place"
    assert annotation(cnpg_sim) is None and restarts(cnpg_sim) == []


async def test_a_worker_killed_while_asking_for_the_restart_leaves_exactly_one_rolling_restart(
    job_kit: KitFactory,
) -> None:
    kit = await job_kit(pg_restart.JOB, cluster=True, profile="cnpg", lease_ttl_s=4)
    job_id = await kit.submit("pg-restart", namespace="db", cluster="pg", profile="cnpg", method="in-place")

    # The annotation's patch is held by the API server, lands all the same, and its worker dies before the answer.
    async with kit.worker_dies_with_request_in_flight(
        job_id, "restart-replicas", verb="patch", resource="clusters"
    ) as patches:
        pass
    job = await kit.run_to_end(job_id)

    assert job["status"] == "success", job
    assert patches.hits == 1, "the step that ran again found its own annotation and asked nothing"
    assert restarts(kit.cluster) == [("pg-3", "replica"), ("pg-2", "replica"), ("pg-1", "primary")]
    step = step_of(job, "restart-replicas")
    assert step["attempts"] == 2
    assert step["detail"].startswith(f"{RESTART_ANNOTATION} already {job['state']['restart_asked']}: asked earlier")
