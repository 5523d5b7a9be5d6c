"""pg-switchover on CloudNativePG (profile cnpg): the new primary named in the Cluster's status.targetPrimary, as
`kubectl cnpg promote` does, against the simulated operator under the shipped worker Role. A named and a chosen
candidate, the refusals (nothing asked), the dry run, and a worker SIGKILLed while its request is in flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs import pg_switchover
from service.settings import Settings
from tests.conftest import kube_settings_for
from tests.conftest import step_details as details
from tests.kit import KitFactory, step_of
from tests.kube_sim import KubeSim
from tests.test_pg_switchover import STEPS, switch


async def promote(client: httpx.AsyncClient, settings: Settings, sim: KubeSim, tmp_path: Path, **params: Any) -> Any:
    return await switch(client, settings, kube_settings_for(sim, tmp_path / "kubeconfig"), profile="cnpg", **params)


def promotions(sim: KubeSim) -> list[tuple[str, str, int]]:
    return [(p.primary, p.target, p.timeline) for p in sim.promotions]


async def test_switchover_to_a_healthy_replica_makes_it_the_primary(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    job = await promote(client, settings, cnpg_sim, tmp_path, candidate="pg-3")

    assert job["status"] == "success", job
    assert [(s["name"], s["status"], s["attempts"]) for s in job["steps"]] == [(n, "success", 1) for n in STEPS]
    assert promotions(cnpg_sim) == [("pg-1", "pg-3", 2)]
    assert cnpg_sim.primary() == "pg-3"
    status = (cnpg_sim.cnpg_cluster() or {})["status"]
    assert status["currentPrimary"] == status["targetPrimary"] == "pg-3"
    detail = details(job)
    assert detail["read-topology"] == (
        "primary pg-1 on timeline 1; members: pg-1 (primary, Ready, healthy, timeline 1), "
        "pg-2 (replica, Ready, healthy, timeline 1), pg-3 (replica, Ready, healthy, timeline 1); candidate pg-3 (named)"
    )
    assert detail["check-candidate"] == (
        "Cluster pg (Cluster in healthy state, primary pg-1, 3/3 ready); candidate pg-3 (replica, Ready, healthy, "
        "timeline 1) may be promoted; CloudNativePG's Cluster status reports no lag: max_lag_bytes not applied"
    )
    assert detail["switchover"] == (
        "set status.targetPrimary of Cluster pg to pg-3, as kubectl cnpg promote does (primary was pg-1)"
    )
    assert detail["wait-new-leader"] == "pg-3 is the primary on timeline 2 (was pg-1 on timeline 1); labelled primary"
    assert detail["wait-replicas"].startswith(
        "pg-1 (replica, Ready, healthy, timeline 2), pg-2 (replica, Ready, healthy, timeline 2) follow pg-3; "
        "Cluster pg (Cluster in healthy state, primary pg-3, 3/3 ready)"
    )


async def test_the_first_healthy_replica_is_chosen_when_none_is_named(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    job = await promote(client, settings, cnpg_sim, tmp_path)

    assert job["status"] == "success", job
    assert details(job)["read-topology"].endswith(
        "candidate pg-2 (the first healthy replica: the Cluster status reports no lag)"
    )
    assert promotions(cnpg_sim) == [("pg-1", "pg-2", 2)]


@pytest.mark.parametrize(
    ("candidate", "setup", "step", "refusal"),
    [
        ("pg-1", None, "check-candidate", "candidate pg-1 is the current primary"),
        ("pg-9", None, "check-candidate", "candidate pg-9 is not an instance of Cluster pg (pg-1, pg-2, pg-3)"),
        (
            "pg-3",
            "switching",
            "read-topology",
            "Cluster pg (Switchover in progress, primary pg-1, switching over to pg-9, 3/3 ready): a switchover is "
            "already under way",
        ),
        (
            "pg-3",
            "not-ready",
            "read-topology",
            "Cluster pg (Waiting for the instances to become active, primary pg-1, 2/3 ready) is not healthy: "
            "Waiting for pg-3",
        ),
    ],
)
async def test_an_unsafe_switchover_is_refused_and_nothing_asked(
    client: httpx.AsyncClient,
    settings: Settings,
    cnpg_sim: KubeSim,
    tmp_path: Path,
    candidate: str,
    setup: str | None,
    step: str,
    refusal: str,
) -> None:
    if setup == "switching":  # a promotion the operator cannot carry out: the target is no instance
        cnpg_sim.cnpg_promote("pg-9")
    elif setup == "not-ready":
        cnpg_sim.not_ready("pg-3")
    await cnpg_sim.wait_for(
        lambda: setup is None or (cnpg_sim.cnpg_cluster() or {})["status"]["phase"] != "Cluster in healthy state"
    )

    job = await promote(client, settings, cnpg_sim, tmp_path, candidate=candidate)

    assert job["status"] == "failed"
    assert details(job)[step] == f"error: Refused: {refusal}"
    assert cnpg_sim.promotions == [] and cnpg_sim.primary() == "pg-1"


async def test_dry_run_checks_and_asks_nothing(
    client: httpx.AsyncClient, settings: Settings, cnpg_sim: KubeSim, tmp_path: Path
) -> None:
    job = await promote(client, settings, cnpg_sim, tmp_path, candidate="pg-2", dry_run=True)

    assert job["status"] == "success", job
    assert details(job)["switchover"] == (
        "dry run: would set status.targetPrimary of Cluster pg to pg-2, as kubectl cnpg promote does"
    )
    assert (cnpg_sim.cnpg_cluster() or {})["status"]["targetPrimary"] == "pg-1"
    assert cnpg_sim.promotions == []


async def test_a_worker_killed_while_asking_for_the_switchover_leaves_exactly_one(job_kit: KitFactory) -> None:
    kit = await job_kit(pg_switchover.JOB, cluster=True, profile="cnpg", lease_ttl_s=4)
    sim = kit.cluster
    job_id = await kit.submit("pg-switchover", namespace="db", cluster="pg", candidate="pg-2", profile="cnpg")

    in_flight = kit.worker_dies_with_request_in_flight(job_id, "switchover", verb="patch", resource="clusters/status")
    async with in_flight as patches:
        pass

    job = await kit.run_to_end(job_id)
    assert job["status"] == "success", job
    assert promotions(sim) == [("pg-1", "pg-2", 2)]
    assert patches.hits == 1, "the step that ran again saw the switchover asked and asked nothing"
    step = step_of(job, "switchover")
    assert step["attempts"] == 2
    assert step["detail"] in (
        "status.targetPrimary already names pg-2: asked earlier, not asked again",
        "Cluster pg (Cluster in healthy state, primary pg-2, 3/3 ready): switched over earlier in this job, "
        "nothing asked",
    )
