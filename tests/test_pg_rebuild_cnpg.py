"""pg-rebuild on CloudNativePG (profile cnpg), against the simulated cluster's Cluster resource and operator under
the shipped worker Role: the PVC and then the pod are deleted, as CloudNativePG's docs say to have an instance
re-cloned, and the operator's replacement, under the next serial, is waited for. Refusals, the dry run, and a worker
SIGKILLed while its delete is in flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs import pg_rebuild
from service.settings import Settings
from tests.conftest import kube_settings_for
from tests.kit import KitFactory, step_of
from tests.kube_sim import KubeSim
from tests.pgsteps import run_each_step_twice
from tests.test_pg_rebuild import STEPS, rebuild, steps, world


def uid(sim: KubeSim, resource: str, name: str) -> str:
    found = sim.pod(name) if resource == "pods" else sim.pvc(name)
    assert found is not None, f"no {resource} {name}"
    return str(found["metadata"]["uid"])


def cluster_status(sim: KubeSim) -> Any:
    return (sim.cnpg_cluster() or {})["status"]


async def test_rebuilds_a_replica_which_comes_back_under_the_next_serial(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    old_pod, old_pvc = uid(cnpg_sim, "pods", "pg-2"), uid(cnpg_sim, "pvc", "pg-2")
    untouched = {k: v for k, v in world(cnpg_sim).items() if not k.endswith("/pg-2")}

    kube = kube_settings_for(cnpg_sim, tmp_path / "kubeconfig")
    job = await rebuild(client, settings, kube, pod="pg-2", profile="cnpg")

    assert job["status"] == "success", job
    assert [(s["name"], s["status"]) for s in job["steps"]] == [(name, "success") for name in STEPS]
    new_pod = uid(cnpg_sim, "pods", "pg-4")
    assert cnpg_sim.pod("pg-2") is None and cnpg_sim.pvc("pg-2") is None
    assert {k: v for k, v in world(cnpg_sim).items() if k in untouched} == untouched
    status = cluster_status(cnpg_sim)
    assert status["instanceNames"] == ["pg-1", "pg-3", "pg-4"] and status["latestGeneratedNode"] == 4
    assert status["currentPrimary"] == "pg-1" and cnpg_sim.primary() == "pg-1"
    detail = {name: s["detail"] for name, s in steps(job).items()}
    assert detail["preflight"] == (
        f"pod pg-2 (uid {old_pod}, node node-c) of CloudNativePG Cluster pg (Cluster in healthy state, primary pg-1, "
        f"3/3 ready); data PVCs: pg-2 (uid {old_pvc}, 10Gi, Bound)"
    )
    assert detail["check-cluster-health"] == (
        "primary pg-1 healthy; 2/2 other members ready (pg-1, pg-3); pg-2 is replica; "
        "labels only: profile cnpg has no Patroni"
    )
    assert detail["delete-pvcs"] == f"deleted PVC pg-2 (uid {old_pvc}) (each stays Terminating until pod pg-2 is gone)"
    assert detail["delete-pod"] == f"deleted pod pg-2 (uid {old_pod}, node node-c) with grace period 1800s"
    assert detail["wait-old-gone"].startswith("old pod pg-2 and PVCs pg-2 gone")
    assert detail["wait-scheduled"].startswith(f"pod pg-4 (uid {new_pod}) scheduled on node-b; PVCs pg-4 (uid ")
    assert detail["wait-ready"].startswith(
        f"pod pg-4 (uid {new_pod}) Ready as replica, labels only: profile cnpg has no Patroni, after "
    )
    assert detail["post-check"] == (
        f"primary pg-1 unchanged; 3/3 members ready; pg-2 rebuilt as pg-4 (uid {old_pod} -> {new_pod})"
    )


@pytest.mark.parametrize(
    ("pod", "setup", "step", "refusal"),
    [
        ("pg-1", None, "check-cluster-health", "pod pg-1 is the primary (cnpg.io/instanceRole=primary); only replicas"),
        (
            "pg-2",
            "switching",
            "preflight",
            "Cluster pg (Switchover in progress, primary pg-1, switching over to pg-9, 3/3 ready) is switching over",
        ),
        ("pg-2", "zalando", "preflight", "pod pg-2 is not a member of cluster pg: labels do not match application"),
    ],
)
async def test_refusals_delete_nothing(
    client: httpx.AsyncClient,
    settings: Settings,
    cnpg_sim: KubeSim,
    tmp_path: Path,
    pod: str,
    setup: str | None,
    step: str,
    refusal: str,
) -> None:
    if setup == "switching":  # a promotion the operator cannot carry out: the target is no instance
        cnpg_sim.cnpg_promote("pg-9")
        await cnpg_sim.wait_for(lambda: cluster_status(cnpg_sim)["phase"] == "Switchover in progress")
    before = world(cnpg_sim)

    kube = kube_settings_for(cnpg_sim, tmp_path / "kubeconfig")
    job = await rebuild(client, settings, kube, pod=pod, profile="zalando" if setup == "zalando" else "cnpg")

    assert job["status"] == "failed"
    assert steps(job)[step]["detail"].startswith(f"error: Refused: {refusal}"), steps(job)[step]["detail"]
    assert world(cnpg_sim) == before


async def test_dry_run_deletes_nothing(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    before = world(cnpg_sim)

    kube = kube_settings_for(cnpg_sim, tmp_path / "kubeconfig")
    job = await rebuild(client, settings, kube, pod="pg-3", profile="cnpg", dry_run=True)

    assert job["status"] == "success", job
    assert steps(job)["delete-pod"]["detail"].startswith("dry run: would delete pod pg-3 (uid ")
    assert steps(job)["post-check"]["detail"].endswith(f"pg-3 untouched (dry run) (uid {before['pods/pg-3'][0]})")
    assert world(cnpg_sim) == before


async def test_a_worker_killed_while_its_delete_is_in_flight_leaves_one_new_instance(job_kit: KitFactory) -> None:
    kit = await job_kit(pg_rebuild.JOB, cluster=True, profile="cnpg", lease_ttl_s=4)
    sim = kit.cluster
    old = uid(sim, "pods", "pg-2")
    job_id = await kit.submit("pg-rebuild", namespace="db", cluster="pg", pod="pg-2", profile="cnpg")

    async with kit.worker_dies_with_request_in_flight(job_id, "delete-pod", verb="delete", resource="pods") as deletes:
        pass

    job = await kit.run_to_end(job_id)
    assert job["status"] == "success", job
    delete = step_of(job, "delete-pod")
    assert delete["attempts"] == 2
    assert delete["detail"] in (f"pod pg-2 (uid {old}) already terminating", "pod pg-2 already gone")
    assert deletes.hits == 1, "the step that ran again saw the delete done and did not send another"
    status = cluster_status(sim)
    assert status["instanceNames"] == ["pg-1", "pg-3", "pg-4"] and status["latestGeneratedNode"] == 4
    assert step_of(job, "post-check")["detail"].endswith(
        f"pg-2 rebuilt as pg-4 (uid {old} -> {uid(sim, 'pods', 'pg-4')})"
    )


async def test_a_replacement_that_crash_loops_fails_fast_under_its_new_name(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    cnpg_sim.crash_loop("pg-4")  # the instance the operator will create: faults stick to names

    kube = kube_settings_for(cnpg_sim, tmp_path / "kubeconfig")
    job = await rebuild(client, settings, kube, pod="pg-2", profile="cnpg")

    assert job["status"] == "failed"
    failed = next(s for s in job["steps"] if s["status"] == "failed")
    assert failed["name"] in ("wait-scheduled", "wait-ready")
    assert failed["detail"].startswith("error: WontHeal: pod pg-4 container postgres: CrashLoopBackOff: ")


async def test_every_step_can_run_again_and_one_instance_replaces_the_old(cnpg_sim: KubeSim, tmp_path: Path) -> None:
    kube = kube_settings_for(cnpg_sim, tmp_path / "kubeconfig")
    params = pg_rebuild.RebuildParams.model_validate(
        {"namespace": "db", "cluster": "pg", "pod": "pg-2", "profile": "cnpg"}, context={"settings": kube}
    )
    old = uid(cnpg_sim, "pods", "pg-2")

    state: dict[str, Any] = {}
    runs = await run_each_step_twice(pg_rebuild.STEPS, kube, params, state)

    status = cluster_status(cnpg_sim)
    assert status["instanceNames"] == ["pg-1", "pg-3", "pg-4"] and status["latestGeneratedNode"] == 4
    assert state["replacement"] == "pg-4"
    assert runs["delete-pod"][1] in (f"pod pg-2 (uid {old}) already terminating", "pod pg-2 already gone")
    new = uid(cnpg_sim, "pods", "pg-4")
    expected = f"primary pg-1 unchanged; 3/3 members ready; pg-2 rebuilt as pg-4 (uid {old} -> {new})"
    assert runs["post-check"] == (expected, expected)
