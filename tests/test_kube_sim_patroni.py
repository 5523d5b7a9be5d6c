"""Patroni in the simulated cluster, through the API server's pod proxy, seen by the jobs' own client
(jobs.pgkube.patroni over the unmodified kubernetes_asyncio), under the shipped worker Role: the shapes of GET
/cluster and /patroni, a switchover over simulated time with its history, Patroni's refusals in its own words, and
the faults (a 412 or 503 answer, a lagging candidate, a leader lost during the switchover); restarts and re-clones
over simulated time with Patroni's answers, and their faults (a crash loop, a basebackup that keeps failing, a lag
after a restart)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from kubernetes_asyncio import client, config

from jobs.pgkube.kube import Kube, KubeError
from jobs.pgkube.patroni import Patroni, PatroniRefused
from service.jobtypes import TransientError
from tests.conftest import shipped_role_cluster
from tests.kube_sim import KubeSim, MemberFault

MEMBERS = ["pg-0", "pg-1", "pg-2"]


@pytest.fixture
async def sim() -> AsyncIterator[KubeSim]:
    async with shipped_role_cluster() as running:
        yield running


@pytest.fixture
async def patroni(sim: KubeSim, tmp_path: Path) -> AsyncIterator[Patroni]:
    cfg = client.Configuration()
    path = sim.write_kubeconfig(tmp_path / "kubeconfig")
    await config.load_kube_config(config_file=str(path), client_configuration=cfg)
    async with client.ApiClient(cfg) as api:
        yield Patroni(Kube(api, timeout_s=5.0), "db")


def phase_of(sim: KubeSim, pod: str) -> str | None:
    """Patroni's state of the member while a restart or a re-clone runs on it; None when none does."""
    action = sim.patroni.member("db", pod).action
    return action.phase if action else None


def roles(sim: KubeSim) -> dict[str, str | None]:
    return {p["metadata"]["name"]: sim.profile.role_of(p) for p in sim.members()}


async def test_cluster_shows_the_leader_and_streaming_replicas_as_patroni_does(patroni: Patroni) -> None:
    raw = await patroni.get("pg-1", "cluster")

    assert [m["name"] for m in raw["members"]] == MEMBERS
    leader, replica = raw["members"][0], raw["members"][1]
    assert {k: leader[k] for k in ("role", "state", "timeline", "port")} == {
        "role": "leader",
        "state": "running",
        "timeline": 1,
        "port": 5432,
    }
    assert "lag" not in leader and leader["api_url"].endswith(":8008/patroni")
    assert {k: replica[k] for k in ("role", "state", "timeline", "lag")} == {
        "role": "replica",
        "state": "streaming",
        "timeline": 1,
        "lag": 0,
    }
    assert replica["lsn"] == "0/5000060"
    assert "pause" not in raw
    member = await patroni.get("pg-0", "patroni")
    assert member["role"] == "primary" and member["state"] == "running"
    assert member["patroni"] == {"version": "4.0.4", "scope": "pg", "name": "pg-0"}


async def test_switchover_moves_the_leader_bumps_the_timeline_and_is_recorded(sim: KubeSim, patroni: Patroni) -> None:
    said = await patroni.switchover("pg-0", leader="pg-0", candidate="pg-1", timeout_s=10)

    assert said == 'Successfully switched over to "pg-1"'
    assert sim.primary() == "pg-1"
    await sim.wait_for(lambda: roles(sim) == {"pg-0": "replica", "pg-1": "master", "pg-2": "replica"})
    view = await patroni.cluster(MEMBERS)
    assert [m.name for m in view.leaders] == ["pg-1"]
    assert {m.name: (m.state, m.timeline) for m in view.members} == {
        "pg-0": ("streaming", 2),
        "pg-1": ("running", 2),
        "pg-2": ("streaming", 2),
    }
    assert [(s.leader, s.candidate, s.new_leader, s.timeline) for s in sim.switchovers] == [("pg-0", "pg-1", "pg-1", 2)]


@pytest.mark.parametrize(
    ("setup", "leader", "candidate", "answer"),
    [
        (None, "", "pg-1", "(HTTP 400): Switchover could be performed only from a specific leader"),
        (None, "pg-0", "pg-0", "(HTTP 400): Switchover target and source are the same"),
        (None, "pg-2", "pg-1", "(HTTP 412): leader name does not match"),
        (None, "pg-0", "pg-7", "(HTTP 412): candidate does not exists"),
        ("nofailover", "pg-0", "pg-1", "(HTTP 412): switchover is not possible: no good candidates have been found"),
        ("sync", "pg-0", "pg-1", "(HTTP 412): candidate name does not match with sync_standby"),
    ],
)
async def test_refusals_are_patronis_own_and_change_nothing(
    sim: KubeSim, patroni: Patroni, setup: str | None, leader: str, candidate: str, answer: str
) -> None:
    if setup == "nofailover":
        sim.tag("pg-1", nofailover=True)
    elif setup == "sync":
        state = sim.patroni_cluster()
        state.synchronous_mode, state.sync_standby = True, "pg-2"

    with pytest.raises(PatroniRefused) as refused:
        await patroni.switchover("pg-0", leader=leader, candidate=candidate, timeout_s=10)

    assert str(refused.value) == f"Patroni refused the switchover {answer}"
    assert sim.primary() == "pg-0" and sim.switchovers == []


async def test_injected_answers_pass_through_the_proxy(sim: KubeSim, patroni: Patroni) -> None:
    sim.patroni_answer(503)
    with pytest.raises(TransientError, match=r"could not switchover now \(HTTP 503\): Switchover failed"):
        await patroni.switchover("pg-0", leader="pg-0", candidate="pg-1", timeout_s=10)
    sim.patroni_answer(412, message="switchover is not possible: no good candidates have been found")
    with pytest.raises(PatroniRefused, match="no good candidates"):
        await patroni.switchover("pg-0", leader="pg-0", candidate="pg-1", timeout_s=10)
    assert sim.switchovers == []

    assert await patroni.switchover("pg-0", leader="pg-0", candidate="pg-1", timeout_s=10) == (
        'Successfully switched over to "pg-1"'
    )


async def test_a_lagging_candidate_does_not_promote_itself(sim: KubeSim, patroni: Patroni) -> None:
    sim.lag("pg-1", 5 * 1024 * 1024)
    view = await patroni.cluster(MEMBERS)
    assert view.member("pg-1") is not None and view.member("pg-1").lag == 5 * 1024 * 1024  # type: ignore[union-attr]

    with pytest.raises(TransientError, match="Switchover failed"):
        await patroni.switchover("pg-0", leader="pg-0", candidate="pg-1", timeout_s=10)
    assert sim.primary() == "pg-0" and sim.switchovers == []


async def test_a_leader_lost_during_the_switchover_ends_with_another_leader(sim: KubeSim, patroni: Patroni) -> None:
    sim.lose_leader(to="pg-2", seconds=0.3)

    said = await patroni.switchover("pg-0", leader="pg-0", candidate="pg-1", timeout_s=10)

    assert said == 'Switched over to "pg-2" instead of "pg-1"'
    assert sim.primary() == "pg-2"
    assert [(s.candidate, s.new_leader) for s in sim.switchovers] == [("pg-1", "pg-2")]


async def test_restart_and_reinitialize_answer_as_patroni(sim: KubeSim, patroni: Patroni) -> None:
    before = await patroni.status("pg-1")
    assert before.state == "running" and before.started is not None

    assert await patroni.restart("pg-1", pending_only=False, timeout_s=10) == "restarted successfully"
    after = await patroni.status("pg-1")
    assert after.started is not None and after.started > before.started, "a new postmaster start time"
    with pytest.raises(PatroniRefused, match="PostgreSQL role should be either primary, standby_leader, or replica"):
        await patroni.post("pg-1", "restart", {"role": "boss"})
    with pytest.raises(PatroniRefused, match=r"\(HTTP 400\): Unknown filter for the scheduled restart: when"):
        await patroni.post("pg-1", "restart", {"when": "now"})
    with pytest.raises(TransientError, match="restart conditions are not satisfied"):
        await patroni.restart("pg-2", pending_only=True, timeout_s=10)
    with pytest.raises(TransientError, match="I am the leader, can not reinitialize"):
        await patroni.reinitialize("pg-0")
    assert await patroni.reinitialize("pg-2") == "reinitialize started"
    assert (await patroni.cluster(MEMBERS)).member("pg-2").state == "creating replica"  # type: ignore[union-attr]
    assert (await patroni.status("pg-2")).started is None, "PostgreSQL is down while it is re-cloned"
    with pytest.raises(TransientError, match="reinitialize already in progress"):
        await patroni.reinitialize("pg-2")
    with pytest.raises(TransientError, match="reinitialize already in progress"):
        await patroni.restart("pg-2", pending_only=False, timeout_s=10)
    assert sim.restarts == ["pg-1"] and sim.reinits == ["pg-2"]


async def test_only_a_member_pending_restart_restarts_with_restart_pending(sim: KubeSim, patroni: Patroni) -> None:
    sim.pending_restart("pg-2")
    assert [m.name for m in (await patroni.cluster(MEMBERS)).members if m.pending_restart] == ["pg-2"]

    assert await patroni.restart("pg-2", pending_only=True, timeout_s=10) == "restarted successfully"
    assert not (await patroni.status("pg-2")).pending_restart


async def test_a_crash_looping_restart_fails_and_the_member_keeps_crashing(sim: KubeSim, patroni: Patroni) -> None:
    sim.member_fault("pg-1", MemberFault.RESTART_CRASH_LOOP)

    with pytest.raises(TransientError, match="restart failed"):
        await patroni.restart("pg-1", pending_only=False, timeout_s=10)
    for phase in ("starting", "crashed", "starting"):  # Patroni tries to start it on every cycle, in vain
        await sim.wait_for(lambda: phase_of(sim, "pg-1") == phase, within=5)  # noqa: B023
        assert (await patroni.status("pg-1")).started is None

    sim.member_fault("pg-1", None)
    await sim.wait_for(lambda: phase_of(sim, "pg-1") is None)
    assert (await patroni.cluster(MEMBERS)).member("pg-1").state == "streaming"  # type: ignore[union-attr]


async def test_a_failing_basebackup_is_begun_again_and_again(sim: KubeSim, patroni: Patroni) -> None:
    sim.member_fault("pg-1", MemberFault.BASEBACKUP_FAILS)

    assert await patroni.reinitialize("pg-1") == "reinitialize started"
    await sim.wait_for(lambda: sim.patroni.member("db", "pg-1").basebackups >= 3)
    assert sim.reinits == ["pg-1"], "Patroni's own retries, one request"


async def test_a_replica_lags_after_its_restart_when_told_to(sim: KubeSim, patroni: Patroni) -> None:
    sim.lag_after_restart("pg-2", 4096)

    await patroni.restart("pg-2", pending_only=False, timeout_s=10)

    assert (await patroni.cluster(MEMBERS)).member("pg-2").lag == 4096  # type: ignore[union-attr]


async def test_a_missing_pod_is_the_api_servers_404_and_the_view_comes_from_the_next_member(
    sim: KubeSim, patroni: Patroni
) -> None:
    with pytest.raises(KubeError, match=r'Kubernetes API HTTP 404: pods "pg-9" not found'):
        await patroni.get("pg-9", "cluster")
    # The API server cannot reach Patroni on the pod (as while its container restarts): its own 503 Status.
    sim.fail(503, verb="get", resource="pods/proxy", name="pg-1", message="error trying to reach service")
    with pytest.raises(TransientError, match="Kubernetes API HTTP 503: error trying to reach service"):
        await patroni.get("pg-1", "cluster")
    sim.fail(503, verb="get", resource="pods/proxy", name="pg-1")

    assert (await patroni.cluster(["pg-9", "pg-1", "pg-2"])).via == "pg-2"


async def test_the_admin_endpoint_injects_patroni_faults(sim: KubeSim, patroni: Patroni) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as admin:
        for spec in (
            {"kind": "lag", "name": "pg-2", "bytes": 2048},
            {"kind": "patroni", "status": 503, "endpoint": "cluster", "method": "get", "name": "pg-0"},
            {"kind": "leader_lost", "to": "pg-2", "seconds": 0.1},
            {"kind": "member", "name": "pg-1", "fault": "basebackup_fails"},
            {"kind": "lag_after_restart", "name": "pg-2", "bytes": 10},
            {"kind": "pending_restart", "name": "pg-2"},
        ):
            response = await admin.post("/_sim/faults", json=spec)
            assert response.status_code == 200, response.text

    view = await patroni.cluster(["pg-0", "pg-1"])  # pg-0's Patroni answers 503 once: pg-1's view
    assert view.via == "pg-1" and view.members[2].lag == 2048
    assert await patroni.switchover("pg-0", leader="pg-0", candidate="pg-1", timeout_s=10) == (
        'Switched over to "pg-2" instead of "pg-1"'
    )
    assert sim.faults.member("db", "pg-1") is MemberFault.BASEBACKUP_FAILS
    assert sim.faults.lag_after_restart == {("db", "pg-2"): 10}
    assert sim.patroni.member("db", "pg-2").pending_restart
