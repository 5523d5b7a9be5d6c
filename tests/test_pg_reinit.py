"""pg-reinit end to end: the real API and the real arq worker against the simulated cluster, whose Patroni re-clones
members through the pod proxy, under the shipped worker Role.

A healthy replica re-cloned in place (no pod or volume deleted), the leader and a member already re-cloning refused
before Patroni is asked, a basebackup that keeps failing failing the job fast, the dry run, the Patroni profiles,
CloudNativePG refused at submission, every step run twice asking Patroni once, and a worker SIGKILLed with its
POST /reinitialize in flight leaving exactly one re-clone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs import pg_reinit
from jobs.pg_rebuild import PgRebuildSettings
from jobs.pgkube.kube import lifespan
from jobs.pgkube.patroni import Patroni
from service.settings import Settings
from tests.conftest import kube_settings_for, run_pg_job, shipped_role_cluster
from tests.conftest import step_details as details
from tests.kit import KitFactory, step_of
from tests.kube_sim import KubeSim, MemberFault
from tests.pgsteps import run_each_step_twice
from tests.test_pg_rebuild_faults import FakeContext

STEPS = ["check-member", "reinitialize", "wait-streaming"]


async def reinit(client: httpx.AsyncClient, settings: Settings, kube: PgRebuildSettings, **params: Any) -> Any:
    return await run_pg_job(client, settings, kube, "pg-reinit", **params)


async def test_a_healthy_replica_is_re_cloned_in_place_and_streams_again(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    pod_uid = kube_sim.pod("pg-1")["metadata"]["uid"]  # type: ignore[index]
    pvc_uid = kube_sim.pvc("data-pg-1")["metadata"]["uid"]  # type: ignore[index]

    job = await reinit(client, settings, kube_settings, pod="pg-1")

    assert job["status"] == "success", job
    assert [(s["name"], s["status"], s["attempts"]) for s in job["steps"]] == [(n, "success", 1) for n in STEPS]
    assert kube_sim.reinits == ["pg-1"]
    assert kube_sim.patroni.member("db", "pg-1").basebackups == 1
    assert kube_sim.pod("pg-1")["metadata"]["uid"] == pod_uid  # type: ignore[index]
    assert kube_sim.pvc("data-pg-1")["metadata"]["uid"] == pvc_uid, "the volume is kept"  # type: ignore[index]
    detail = details(job)
    assert detail["check-member"] == (
        "leader pg-0 on timeline 1; members: pg-0 (running, timeline 1), pg-1 (streaming, timeline 1, lag 0 B), "
        "pg-2 (streaming, timeline 1, lag 0 B); pg-1 is a replica that may be re-cloned"
    )
    assert detail["reinitialize"] == "Patroni: reinitialize started"
    assert detail["wait-streaming"].startswith("pg-1 (streaming, timeline 1, lag 0 B) streams from pg-0, started again")


@pytest.mark.parametrize(
    ("pod", "refusal"),
    [
        ("pg-0", "pg-0 is the leader: Patroni re-clones replicas only; switch over first"),
        ("pg-9", "pg-9 is not a member of cluster pg (pg-0, pg-1, pg-2)"),
        (
            "pg-1",
            "pg-1 is already being re-cloned (creating replica): a second re-clone over the first could wipe the "
            "data directory it is copying into",
        ),
    ],
)
async def test_the_leader_an_unknown_pod_and_a_member_already_re_cloning_are_refused_before_patroni_is_asked(
    client: httpx.AsyncClient,
    settings: Settings,
    kube_settings: PgRebuildSettings,
    kube_sim: KubeSim,
    pod: str,
    refusal: str,
) -> None:
    kube_sim.recloning("pg-1")  # someone else's re-clone, which takes a while

    job = await reinit(client, settings, kube_settings, pod=pod)

    assert job["status"] == "failed"
    assert details(job)["check-member"] == f"error: Refused: {refusal}"
    assert kube_sim.patroni_requests("POST", "reinitialize") == 0


async def test_a_basebackup_that_keeps_failing_fails_the_job_fast(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    kube_sim.member_fault("pg-2", MemberFault.BASEBACKUP_FAILS)

    job = await reinit(client, settings, kube_settings, pod="pg-2")

    assert job["status"] == "failed"
    step = step_of(job, "wait-streaming")
    assert step["attempts"] == 1
    assert step["detail"] == (
        "error: WontHeal: pg-2's basebackup keeps failing: Patroni began 3 basebackups, each after the last failed "
        "(now creating replica)"
    )
    assert kube_sim.reinits == ["pg-2"], "one request: the retries are Patroni's own"


async def test_patroni_refusing_after_the_check_fails_the_job_at_once(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    # The member became the leader between the check and the request (as after a failover).
    kube_sim.patroni_answer(503, endpoint="reinitialize", message="I am the leader, can not reinitialize")

    job = await reinit(client, settings, kube_settings, pod="pg-1")

    assert job["status"] == "failed"
    step = step_of(job, "reinitialize")
    assert step["attempts"] == 1
    assert step["detail"] == "error: Refused: Patroni on pg-1: I am the leader, can not reinitialize"
    assert kube_sim.reinits == []


async def test_dry_run_checks_and_asks_nothing(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    job = await reinit(client, settings, kube_settings, pod="pg-2", dry_run=True)

    assert job["status"] == "success", job
    detail = details(job)
    assert detail["reinitialize"] == "dry run: would ask Patroni on pg-2 to re-clone it from the leader pg-0"
    assert detail["wait-streaming"] == "dry run: no re-clone asked, nothing to wait for"
    assert kube_sim.patroni_requests("POST", "reinitialize") == 0


@pytest.mark.parametrize("profile", ["patroni", "pgo", "stackgres"])
async def test_re_clones_with_every_patroni_profile(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path, profile: str
) -> None:
    async with shipped_role_cluster(profile) as sim:
        kube = kube_settings_for(sim, tmp_path / "kubeconfig")
        job = await reinit(client, settings, kube, pod="pg-2", profile=profile)

        assert job["status"] == "success", job
        assert sim.reinits == ["pg-2"]


async def test_cloudnativepg_is_refused_at_submission(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/ops/jobs/pg-reinit", json={"namespace": "db", "cluster": "pg", "pod": "pg-1", "profile": "cnpg"}
    )

    assert response.status_code == 422, response.text
    assert "CloudNativePG has no Patroni; a re-clone" in response.text


async def test_job_type_lists_its_steps(client: httpx.AsyncClient) -> None:
    types = {t["name"]: t for t in (await client.get("/ops/job-types")).json()["job_types"]}

    assert types["pg-reinit"]["steps"] == STEPS


async def test_every_step_can_run_again_and_patroni_is_asked_once(
    kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    params = pg_reinit.ReinitParams.model_validate(
        {"namespace": "db", "cluster": "pg", "pod": "pg-1"}, context={"settings": kube_settings}
    )
    state: dict[str, Any] = {}
    runs = await run_each_step_twice(pg_reinit.STEPS, kube_settings, params, state)

    assert kube_sim.reinits == ["pg-1"]
    assert runs["check-member"][0] == runs["check-member"][1]
    assert runs["reinitialize"][0] == "Patroni: reinitialize started"
    assert runs["reinitialize"][1] is not None
    assert runs["reinitialize"][1].startswith("the re-clone of pg-1 was asked earlier in this job"), runs


async def test_a_request_lost_with_its_worker_is_waited_for_then_sent_again(
    kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    params = pg_reinit.ReinitParams.model_validate(
        {"namespace": "db", "cluster": "pg", "pod": "pg-1", "reinit_timeout_s": 0.5},
        context={"settings": kube_settings},
    )
    async with lifespan(kube_settings) as clients:
        state: dict[str, Any] = {}
        await pg_reinit.check_member(FakeContext(clients, kube_settings, state), params)
        status = await Patroni(clients.kube(None), "db").status("pg-1")
        # A worker recorded the request and died before it reached Patroni: nothing happened to the member.
        state["reinit"] = {"member": "pg-1", "before": status.started, "state": status.state, "sent": True}
        resumed = FakeContext(clients, kube_settings, state, "resumed")
        said = await pg_reinit.reinitialize(resumed, params)

    assert said == "Patroni: reinitialize started"
    assert resumed.details[-1].startswith("waiting for the re-clone of pg-1 asked earlier in this job, pg-1 running")
    assert kube_sim.reinits == ["pg-1"]


async def test_a_worker_killed_with_its_reinitialize_in_flight_leaves_exactly_one_re_clone(
    job_kit: KitFactory,
) -> None:
    """The most dangerous moment: the POST /reinitialize has left and the worker dies before Patroni's answer. The
    request lands all the same (the cluster holds it, then carries it out); the step that runs again finds the
    member re-cloning or re-cloned and asks nothing: two overlapping re-clones have wiped a data directory upstream."""
    kit = await job_kit(pg_reinit.JOB, cluster=True, lease_ttl_s=4)
    sim = kit.cluster
    job_id = await kit.submit("pg-reinit", namespace="db", cluster="pg", pod="pg-1")

    async with kit.worker_dies_with_request_in_flight(job_id, "reinitialize", verb="create", resource="pods/proxy"):
        assert sim.reinits == []
    job = await kit.run_to_end(job_id)

    assert job["status"] == "success", job
    assert sim.reinits == ["pg-1"], "one re-clone, however many times the step ran"
    assert sim.patroni_requests("POST", "reinitialize") == 1, "the resumed step asked nothing"
    assert step_of(job, "reinitialize")["attempts"] == 2
