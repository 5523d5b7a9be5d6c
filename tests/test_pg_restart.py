"""pg-restart end to end: the real API and the real arq worker against the simulated cluster, whose Patroni restarts
members through the pod proxy, under the shipped worker Role.

A rolling restart (the replicas one at a time, a switchover, the former primary last, each member once),
only_pending_restart, the in-place method, the refusal of an unhealthy cluster, a replica lagging after its restart
waited for, a crash-looping restart failing fast, the dry run, the Patroni profiles, and a worker SIGKILLed during
the primary's switchover and during the primary's restart. CloudNativePG: tests/test_pg_restart_cnpg.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs import pg_restart
from jobs.pg_rebuild import PgRebuildSettings
from jobs.pgkube.rolling import RestartParams
from service.settings import Settings
from tests.conftest import kube_settings_for, run_pg_job, shipped_role_cluster
from tests.conftest import step_details as details
from tests.kit import KitFactory, step_of
from tests.kube_sim import KubeSim, MemberFault
from tests.pgsteps import run_each_step_twice
from tests.test_pg_switchover import history

STEPS = ["read-topology", "restart-replicas", "switchover", "restart-primary"]
MIB = 1024 * 1024


async def restart(client: httpx.AsyncClient, settings: Settings, kube: PgRebuildSettings, **params: Any) -> Any:
    return await run_pg_job(client, settings, kube, "pg-restart", **params)


async def test_a_rolling_restart_restarts_each_member_once_and_the_primary_last_after_a_switchover(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    job = await restart(client, settings, kube_settings)

    assert job["status"] == "success", job
    assert [(s["name"], s["status"], s["attempts"]) for s in job["steps"]] == [(n, "success", 1) for n in STEPS]
    assert kube_sim.restarts == ["pg-1", "pg-2", "pg-0"]
    assert history(kube_sim) == [("pg-0", "pg-1", "pg-1", 2)]
    assert kube_sim.primary() == "pg-1"
    detail = details(job)
    assert detail["read-topology"] == (
        "leader pg-0 on timeline 1; members: pg-0 (running, timeline 1), pg-1 (streaming, timeline 1, lag 0 B), "
        "pg-2 (streaming, timeline 1, lag 0 B); restart order: pg-1, pg-2, pg-0 (the primary, after a switchover)"
    )
    assert detail["restart-replicas"] == "restarted pg-1, pg-2, one at a time, each back streaming within 1048576 bytes"
    assert detail["switchover"].startswith('Patroni: Successfully switched over to "pg-1"; pg-1 leads on timeline 2')
    assert detail["restart-primary"].startswith("pg-0 (streaming, timeline 2, lag 0 B) streams from pg-1, started")
    assert detail["restart-primary"].endswith("; every member restarted once: pg-1, pg-2, pg-0")


async def test_only_pending_restart_skips_the_members_patroni_does_not_flag(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    kube_sim.pending_restart("pg-2")

    job = await restart(client, settings, kube_settings, only_pending_restart=True)

    assert job["status"] == "success", job
    assert kube_sim.restarts == ["pg-2"]
    assert kube_sim.switchovers == [] and kube_sim.primary() == "pg-0"
    detail = details(job)
    assert detail["read-topology"].endswith("restart order: pg-2; skipped (no pending restart): pg-0, pg-1")
    assert detail["switchover"] == "no switchover: the primary is not to be restarted"
    assert detail["restart-primary"] == "pg-0 not restarted: Patroni flags no pending restart on it"
    assert not kube_sim.patroni.member("db", "pg-2").pending_restart


async def test_the_in_place_method_restarts_the_primary_where_it_is(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    job = await restart(client, settings, kube_settings, method="in-place")

    assert job["status"] == "success", job
    assert kube_sim.restarts == ["pg-1", "pg-2", "pg-0"]
    assert kube_sim.switchovers == [] and kube_sim.primary() == "pg-0"
    detail = details(job)
    assert detail["switchover"] == "no switchover: method in-place"
    assert detail["restart-primary"].startswith("pg-0 (running, timeline 1) leads, started again at ")


async def test_a_crash_looping_restart_fails_fast_and_touches_no_other_member(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    kube_sim.member_fault("pg-1", MemberFault.RESTART_CRASH_LOOP)

    job = await restart(client, settings, kube_settings)

    assert job["status"] == "failed"
    step = step_of(job, "restart-replicas")
    assert step["attempts"] == 1
    crash_loop = "error: WontHeal: pg-1 crash-loops after its restart: PostgreSQL failed to start 3 times"
    assert step["detail"].startswith(crash_loop), step["detail"]
    assert kube_sim.restarts == ["pg-1"], "no other member restarted, no restart asked twice"
    assert step_of(job, "switchover")["status"] == "pending"


async def test_a_replica_lagging_after_its_restart_is_waited_for_before_the_next(job_kit: KitFactory) -> None:
    kit = await job_kit(pg_restart.JOB, cluster=True)
    sim = kit.cluster
    sim.lag_after_restart("pg-1", 5 * MIB)
    job_id = await kit.submit("pg-restart", namespace="db", cluster="pg")
    await kit.start_worker()

    job = await kit.wait_for_step(job_id, "restart-replicas", detail="lags 5242880 bytes behind the leader")
    assert "in progress: pg-1; remaining: pg-2, pg-0" in step_of(job, "restart-replicas")["detail"]
    assert sim.restarts == ["pg-1"]
    sim.lag("pg-1", 0)
    job = await kit.run_to_end(job_id)

    assert job["status"] == "success", job
    assert sim.restarts == ["pg-1", "pg-2", "pg-0"]


@pytest.mark.parametrize(
    ("setup", "refusal"),
    [
        (
            "lagging",
            "every member must be healthy before a rolling restart: pg-2 lags 5242880 bytes behind the leader, more "
            "than max_lag_bytes 1048576",
        ),
        (
            "nofailover",
            "no replica may take over from pg-0: pg-1 is tagged nofailover: Patroni will not promote it; pg-2 is "
            "tagged nofailover: Patroni will not promote it",
        ),
    ],
)
async def test_an_unhealthy_cluster_or_one_without_a_successor_is_refused_before_anything_restarts(
    client: httpx.AsyncClient,
    settings: Settings,
    kube_settings: PgRebuildSettings,
    kube_sim: KubeSim,
    setup: str,
    refusal: str,
) -> None:
    if setup == "lagging":
        kube_sim.lag("pg-2", 5 * MIB)
    else:
        kube_sim.tag("pg-1", nofailover=True)
        kube_sim.tag("pg-2", nofailover=True)

    job = await restart(client, settings, kube_settings)

    assert job["status"] == "failed"
    assert details(job)["read-topology"] == f"error: Refused: {refusal}"
    assert kube_sim.restarts == []


async def test_dry_run_checks_and_restarts_nothing(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    job = await restart(client, settings, kube_settings, dry_run=True)

    assert job["status"] == "success", job
    detail = details(job)
    assert detail["restart-replicas"] == "dry run: would restart pg-1, pg-2, one at a time"
    assert detail["switchover"] == "dry run: would ask Patroni to switch over from pg-0 to pg-1"
    assert detail["restart-primary"] == "dry run: would restart pg-0 after the switchover"
    assert kube_sim.restarts == [] and kube_sim.switchovers == []


@pytest.mark.parametrize("profile", ["patroni", "pgo", "stackgres"])
async def test_restarts_with_every_patroni_profile(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path, profile: str
) -> None:
    async with shipped_role_cluster(profile) as sim:
        kube = kube_settings_for(sim, tmp_path / "kubeconfig")
        job = await restart(client, settings, kube, profile=profile)

        assert job["status"] == "success", job
        assert sim.restarts == ["pg-1", "pg-2", "pg-0"]
        assert sim.primary() == "pg-1"


async def test_job_type_lists_its_steps(client: httpx.AsyncClient) -> None:
    types = {t["name"]: t for t in (await client.get("/ops/job-types")).json()["job_types"]}

    assert types["pg-restart"]["steps"] == STEPS


async def test_a_worker_killed_during_the_primarys_switchover_leaves_one_restart_per_member_and_one_switchover(
    job_kit: KitFactory,
) -> None:
    kit = await job_kit(pg_restart.JOB, cluster=True)
    sim = kit.cluster
    sim.slow_switchover(3.0)  # Patroni holds the request this long: the worker dies while it waits for the answer
    job_id = await kit.submit("pg-restart", namespace="db", cluster="pg")

    async with kit.worker_dies_during(job_id, "switchover", when=lambda: sim.patroni_cluster().switchover is not None):
        assert sim.restarts == ["pg-1", "pg-2"] and sim.switchovers == []
    job = await kit.run_to_end(job_id)

    assert job["status"] == "success", job
    assert sim.restarts == ["pg-1", "pg-2", "pg-0"]
    assert history(sim) == [("pg-0", "pg-1", "pg-1", 2)]
    assert sim.patroni_requests("POST", "switchover") == 1, "the resumed step asked nothing"
    assert step_of(job, "switchover")["attempts"] == 2


async def test_a_worker_killed_during_the_primarys_restart_leaves_one_restart_per_member(job_kit: KitFactory) -> None:
    kit = await job_kit(pg_restart.JOB, cluster=True)
    sim = kit.cluster
    sim.slow_restart("pg-0", 3.0)  # the worker dies while Patroni restarts the primary in place
    job_id = await kit.submit("pg-restart", namespace="db", cluster="pg", method="in-place")

    restarting = lambda: sim.patroni.member("db", "pg-0").action is not None  # noqa: E731
    async with kit.worker_dies_during(job_id, "restart-primary", when=restarting):
        assert sim.restarts == ["pg-1", "pg-2", "pg-0"]
    job = await kit.run_to_end(job_id)

    assert job["status"] == "success", job
    assert sim.restarts == ["pg-1", "pg-2", "pg-0"], "no member restarted twice"
    assert sim.patroni_requests("POST", "restart") == 3
    step = step_of(job, "restart-primary")
    assert step["attempts"] == 2, step
    assert step["detail"].startswith("pg-0 (running, timeline 1) leads, started again at "), step["detail"]


async def test_every_step_can_run_again_and_each_member_is_restarted_once(
    kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    params = RestartParams.model_validate({"namespace": "db", "cluster": "pg"}, context={"settings": kube_settings})
    state: dict[str, Any] = {}
    runs = await run_each_step_twice(pg_restart.STEPS, kube_settings, params, state)

    assert kube_sim.restarts == ["pg-1", "pg-2", "pg-0"]
    assert kube_sim.patroni_requests("POST", "switchover") == 1
    assert runs["read-topology"][0] == runs["read-topology"][1], "the topology is recorded once"
    assert runs["restart-replicas"][0] == runs["restart-replicas"][1]
    assert runs["switchover"][1] is not None
    assert runs["switchover"][1].startswith("pg-1 already leads on timeline 2: switched over earlier in this job")
    assert (
        runs["restart-primary"][1]
        == "pg-0 restarted earlier in this job; every member restarted once: pg-1, pg-2, pg-0"
    )
    assert state["restarted"] == ["pg-1", "pg-2", "pg-0"] and state["restarting"] is None
    assert state["remaining"] == []
    assert state["topology"] | {"members": []} == {
        "leader": "pg-0",
        "timeline": 1,
        "members": [],
        "replicas": ["pg-1", "pg-2"],
        "primary": "pg-0",
        "skip": [],
    }
