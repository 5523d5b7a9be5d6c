"""pg-switchover end to end: the real API and the real arq worker against the simulated cluster, whose Patroni
answers through the pod proxy, under the shipped worker Role.

A switchover to a healthy replica, the best one chosen when none is named, the refusals (nothing asked of Patroni),
Patroni's 412 failing at once and its 503 retried, a leader lost during the switchover, the dry run, the Patroni
profiles, and a worker SIGKILLed in the middle of the switchover.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs import pg_switchover
from jobs.pg_rebuild import PgRebuildSettings
from jobs.pgkube.kube import lifespan
from service.settings import Settings
from tests.conftest import kube_settings_for, run_pg_job, shipped_role_cluster
from tests.conftest import step_details as details
from tests.kit import KitFactory, step_of
from tests.kube_sim import KubeSim
from tests.pgsteps import run_each_step_twice
from tests.test_pg_rebuild_faults import FakeContext

STEPS = ["read-topology", "check-candidate", "switchover", "wait-new-leader", "wait-replicas"]
MIB = 1024 * 1024


async def switch(client: httpx.AsyncClient, settings: Settings, kube: PgRebuildSettings, **params: Any) -> Any:
    return await run_pg_job(client, settings, kube, "pg-switchover", **params)


def history(sim: KubeSim) -> list[tuple[str, str, str, int]]:
    return [(s.leader, s.candidate, s.new_leader, s.timeline) for s in sim.switchovers]


async def test_switchover_to_a_healthy_replica_ends_with_it_leading_and_every_replica_streaming_from_it(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    job = await switch(client, settings, kube_settings, candidate="pg-1")

    assert job["status"] == "success", job
    assert job["target"] == "k8s/default/db/pg"
    assert [(s["name"], s["status"], s["attempts"]) for s in job["steps"]] == [(n, "success", 1) for n in STEPS]
    assert kube_sim.primary() == "pg-1"
    assert history(kube_sim) == [("pg-0", "pg-1", "pg-1", 2)]
    assert {p["metadata"]["name"]: kube_sim.profile.role_of(p) for p in kube_sim.members()} == {
        "pg-0": "replica",
        "pg-1": "master",
        "pg-2": "replica",
    }
    detail = details(job)
    assert detail["read-topology"] == (
        "leader pg-0 on timeline 1; members: pg-0 (running, timeline 1), pg-1 (streaming, timeline 1, lag 0 B), "
        "pg-2 (streaming, timeline 1, lag 0 B); candidate pg-1 (named)"
    )
    assert detail["check-candidate"] == (
        "leader pg-0 (timeline 1), cluster not paused; candidate pg-1 streaming on timeline 1, lag 0 bytes "
        "(max_lag_bytes 1048576), may be promoted"
    )
    assert detail["switchover"] == 'Patroni: Successfully switched over to "pg-1"'
    assert detail["wait-new-leader"] == "pg-1 leads on timeline 2 (was pg-0 on timeline 1); labelled master"
    assert detail["wait-replicas"] == (
        "pg-0 (streaming, timeline 2, lag 0 B), pg-2 (streaming, timeline 2, lag 0 B) stream from pg-1"
    )


async def test_switchover_to_a_lagging_replica_is_refused_with_the_lag_and_asks_nothing(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    kube_sim.lag("pg-1", 5 * MIB)

    job = await switch(client, settings, kube_settings, candidate="pg-1")

    assert job["status"] == "failed"
    assert details(job)["check-candidate"] == (
        "error: Refused: candidate pg-1 lags 5242880 bytes behind the leader, more than max_lag_bytes 1048576"
    )
    assert step_of(job, "switchover")["status"] == "pending"
    assert kube_sim.primary() == "pg-0" and kube_sim.switchovers == []


async def test_the_best_replica_is_chosen_when_none_is_named(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    kube_sim.lag("pg-1", 4096)  # within the limit, but pg-2 is closer

    job = await switch(client, settings, kube_settings)

    assert job["status"] == "success", job
    assert details(job)["read-topology"].endswith("candidate pg-2 (the replica with least lag that may take over)")
    assert history(kube_sim) == [("pg-0", "pg-2", "pg-2", 2)]


@pytest.mark.parametrize(
    ("setup", "refusal"),
    [
        ("paused", "cluster pg is paused (Patroni maintenance mode): resume it first"),
        ("nofailover", "candidate pg-1 is tagged nofailover: Patroni will not promote it"),
        ("sync", "candidate pg-1 is not the synchronous standby (pg-2) of a cluster in synchronous mode"),
        ("timeline", "candidate pg-1 is on timeline 2, the leader pg-0 on 3"),
        ("not-a-member", "candidate pg-9 is not a member of cluster pg (pg-0, pg-1, pg-2)"),
    ],
)
async def test_an_unsafe_switchover_is_refused_before_patroni_is_asked(
    client: httpx.AsyncClient,
    settings: Settings,
    kube_settings: PgRebuildSettings,
    kube_sim: KubeSim,
    setup: str,
    refusal: str,
) -> None:
    state = kube_sim.patroni_cluster()
    if setup == "paused":
        state.paused = True
    elif setup == "nofailover":
        kube_sim.tag("pg-1", nofailover=True)
    elif setup == "sync":
        state.synchronous_mode, state.sync_standby = True, "pg-2"
    elif setup == "timeline":  # pg-1 missed the last promotion
        state.timeline = 3
        kube_sim.patroni.member("db", "pg-1").timeline_behind = 1

    job = await switch(client, settings, kube_settings, candidate="pg-9" if setup == "not-a-member" else "pg-1")

    assert job["status"] == "failed"
    assert details(job)["check-candidate"] == f"error: Refused: {refusal}"
    assert kube_sim.primary() == "pg-0" and kube_sim.switchovers == []


async def test_patronis_412_fails_the_job_at_once_with_its_message(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    kube_sim.patroni_answer(412, message="switchover is not possible: no good candidates have been found", times=None)

    job = await switch(client, settings, kube_settings, candidate="pg-1")

    assert job["status"] == "failed"
    step = step_of(job, "switchover")
    assert step["attempts"] == 1
    assert step["detail"] == (
        "error: PatroniRefused: Patroni refused the switchover (HTTP 412): "
        "switchover is not possible: no good candidates have been found"
    )
    assert kube_sim.primary() == "pg-0" and kube_sim.switchovers == []


async def test_patronis_503_is_retried_to_success(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    fault = kube_sim.patroni_answer(503, times=2)

    job = await switch(client, settings, kube_settings, candidate="pg-1")

    assert job["status"] == "success", job
    assert step_of(job, "switchover")["attempts"] == 3
    assert fault.hits == 2
    assert kube_sim.patroni_requests("POST", "switchover") == 3
    assert history(kube_sim) == [("pg-0", "pg-1", "pg-1", 2)]


async def test_a_leader_lost_during_the_switchover_fails_naming_who_leads_now(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    kube_sim.lose_leader(to="pg-2", seconds=0.3)

    job = await switch(client, settings, kube_settings, candidate="pg-1")

    assert job["status"] == "failed"
    assert details(job)["switchover"] == 'error: WontHeal: Patroni: Switched over to "pg-2" instead of "pg-1"'
    assert kube_sim.primary() == "pg-2"


async def test_dry_run_checks_and_asks_nothing(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    job = await switch(client, settings, kube_settings, candidate="pg-2", dry_run=True)

    assert job["status"] == "success", job
    detail = details(job)
    assert detail["switchover"] == "dry run: would ask Patroni to switch over from pg-0 to pg-2"
    assert detail["wait-new-leader"] == detail["wait-replicas"] == "dry run: no switchover asked, nothing to wait for"
    assert kube_sim.primary() == "pg-0" and kube_sim.switchovers == []


@pytest.mark.parametrize("profile", ["patroni", "pgo", "stackgres"])
async def test_switches_over_with_every_patroni_profile(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path, profile: str
) -> None:
    async with shipped_role_cluster(profile) as sim:
        kube = kube_settings_for(sim, tmp_path / "kubeconfig")
        job = await switch(client, settings, kube, candidate="pg-2", profile=profile)

        assert job["status"] == "success", job
        assert sim.primary() == "pg-2"
        labels = {p["metadata"]["name"]: sim.profile.role_of(p) for p in sim.members()}
        assert labels == {"pg-0": "replica", "pg-1": "replica", "pg-2": sim.profile.primary}


async def test_job_type_lists_its_steps(client: httpx.AsyncClient) -> None:
    types = {t["name"]: t for t in (await client.get("/ops/job-types")).json()["job_types"]}

    assert types["pg-switchover"]["steps"] == STEPS


async def test_a_worker_killed_during_the_switchover_leaves_exactly_one_switchover(job_kit: KitFactory) -> None:
    kit = await job_kit(pg_switchover.JOB, cluster=True)
    sim = kit.cluster
    sim.slow_switchover(3.0)  # Patroni holds the request this long: the worker dies while it waits for the answer
    job_id = await kit.submit("pg-switchover", namespace="db", cluster="pg", candidate="pg-1")

    async with kit.worker_dies_during(job_id, "switchover", when=lambda: sim.patroni_cluster().switchover is not None):
        assert sim.switchovers == []
    job = await kit.run_to_end(job_id)

    assert job["status"] == "success", job
    assert history(sim) == [("pg-0", "pg-1", "pg-1", 2)]
    assert sim.patroni_requests("POST", "switchover") == 1, "the resumed step asked nothing"
    step = step_of(job, "switchover")
    assert step["attempts"] == 2, step
    assert step["detail"].startswith("pg-1 leads on timeline 2: ") or step["detail"].startswith(
        "pg-1 already leads on timeline 2: "
    ), step["detail"]


async def test_every_step_can_run_again_and_the_switchover_is_asked_once(
    kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    params = pg_switchover.SwitchoverParams.model_validate(
        {"namespace": "db", "cluster": "pg", "candidate": "pg-2"}, context={"settings": kube_settings}
    )
    state: dict[str, Any] = {}
    runs = await run_each_step_twice(pg_switchover.STEPS, kube_settings, params, state)

    assert history(kube_sim) == [("pg-0", "pg-2", "pg-2", 2)]
    assert kube_sim.patroni_requests("POST", "switchover") == 1
    assert runs["read-topology"][0] == runs["read-topology"][1], "the topology is recorded once"
    assert runs["switchover"] == (
        'Patroni: Successfully switched over to "pg-2"',
        "pg-2 already leads on timeline 2: switched over earlier in this job, nothing sent",
    )
    assert runs["check-candidate"][1] == (
        "leader pg-0 (timeline 1), cluster not paused; candidate pg-2 streaming on timeline 1, lag 0 bytes "
        "(max_lag_bytes 1048576), may be promoted"
    )
    # Run after the switchover, the checks see it done instead of refusing a leader that changed.
    async with lifespan(kube_settings) as clients:
        late = await pg_switchover.check_candidate(FakeContext(clients, kube_settings, state), params)
    assert late == "pg-2 already leads on timeline 2: the switchover happened earlier in this job"
