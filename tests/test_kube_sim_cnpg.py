"""CloudNativePG on the simulated cluster, through the unmodified kubernetes_asyncio client: the `Cluster` custom
resource and its status read and patched as CustomObjectsApi calls them, its operator owning pods and PVCs itself,
recreating a deleted pod under its name, replacing an instance whose PVC was deleted under the next serial,
promoting the pod `status.targetPrimary` names, and rolling every instance when the Cluster's restartedAt
annotation changes (the replicas one at a time, then the primary by its update method; held by a crash loop)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kube_sim import KubeSim
from tests.test_kube_sim import NS, TIMEOUT, connect

GROUP, VERSION, PLURAL = "postgresql.cnpg.io", "v1", "clusters"
MERGE = "application/merge-patch+json"


@pytest.fixture
async def sim() -> AsyncIterator[KubeSim]:
    async with KubeSim.running(profile="cnpg") as running:
        yield running


@pytest.fixture
async def api(sim: KubeSim, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    async with await connect(sim, tmp_path) as api_client:
        yield api_client


async def read_cluster(api: client.ApiClient) -> Any:
    custom = client.CustomObjectsApi(api)
    return await custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "pg", _request_timeout=TIMEOUT)


def names(sim: KubeSim) -> list[str]:
    return [p["metadata"]["name"] for p in sim.members()]


async def test_the_cluster_resource_owns_its_instances_named_by_serial(sim: KubeSim, api: client.ApiClient) -> None:
    cluster = await read_cluster(api)
    pods = (await client.CoreV1Api(api).list_namespaced_pod(NS, label_selector="cnpg.io/cluster=pg")).items

    status = cluster["status"]
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    assert status["currentPrimary"] == status["targetPrimary"] == "pg-1"
    assert status["instanceNames"] == ["pg-1", "pg-2", "pg-3"] and status["latestGeneratedNode"] == 3
    assert status["phase"] == "Cluster in healthy state" and status["readyInstances"] == 3
    assert status["instancesStatus"] == {"healthy": ["pg-1", "pg-2", "pg-3"]}
    assert status["instancesReportedState"]["pg-2"] == {"isPrimary": False, "timeLineID": 1}
    assert [(p.metadata.name, p.metadata.owner_references[0].kind) for p in pods] == [
        ("pg-1", "Cluster"),
        ("pg-2", "Cluster"),
        ("pg-3", "Cluster"),
    ]
    assert [p.metadata.labels["cnpg.io/instanceRole"] for p in pods] == ["primary", "replica", "replica"]
    assert [v.persistent_volume_claim.claim_name for v in pods[1].spec.volumes] == ["pg-2"]
    assert sim.statefulset() is None


async def test_a_deleted_pod_comes_back_under_its_name_on_its_pvc(sim: KubeSim, api: client.ApiClient) -> None:
    pvc_uid = (sim.pvc("pg-2") or {})["metadata"]["uid"]
    pod_uid = (sim.pod("pg-2") or {})["metadata"]["uid"]

    await client.CoreV1Api(api).delete_namespaced_pod("pg-2", NS, _request_timeout=TIMEOUT)
    await sim.wait_for(lambda: _ready_replica(sim, "pg-2", other_than=pod_uid))

    assert (sim.pvc("pg-2") or {})["metadata"]["uid"] == pvc_uid
    assert names(sim) == ["pg-1", "pg-2", "pg-3"]


async def test_an_instance_whose_pvc_was_deleted_first_is_replaced_under_the_next_serial(
    sim: KubeSim, api: client.ApiClient
) -> None:
    core = client.CoreV1Api(api)
    await core.delete_namespaced_persistent_volume_claim("pg-2", NS, _request_timeout=TIMEOUT)
    await core.delete_namespaced_pod("pg-2", NS, _request_timeout=TIMEOUT)

    await sim.wait_for(lambda: _ready_replica(sim, "pg-4"))
    await sim.wait_for(lambda: (sim.cnpg_cluster() or {})["status"]["phase"] == "Cluster in healthy state")

    assert names(sim) == ["pg-1", "pg-3", "pg-4"]
    assert sim.pod("pg-2") is None and sim.pvc("pg-2") is None
    assert (sim.pvc("pg-4") or {})["status"]["phase"] == "Bound"
    status = (await read_cluster(api))["status"]
    assert status["instanceNames"] == ["pg-1", "pg-3", "pg-4"] and status["latestGeneratedNode"] == 4


async def test_setting_the_target_primary_promotes_it(sim: KubeSim, api: client.ApiClient) -> None:
    custom: Any = client.CustomObjectsApi(api)  # the generated signature leaves out `_content_type`
    cluster = await read_cluster(api)
    patch = {
        "metadata": {"resourceVersion": cluster["metadata"]["resourceVersion"]},
        "status": {"targetPrimary": "pg-3"},
    }

    await custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "pg", patch, _content_type=MERGE, _request_timeout=TIMEOUT
    )
    await sim.wait_for(lambda: (sim.cnpg_cluster() or {})["status"]["currentPrimary"] == "pg-3")

    status = (await read_cluster(api))["status"]
    assert status["phase"] == "Cluster in healthy state"
    assert status["currentPrimary"] == status["targetPrimary"] == "pg-3" and status["timelineID"] == 2
    assert sim.primary() == "pg-3"
    assert [(p.primary, p.target, p.timeline) for p in sim.promotions] == [("pg-1", "pg-3", 2)]
    # The same patch again: its resourceVersion is stale now, so the optimistic lock refuses it.
    with pytest.raises(ApiException) as stale:
        await custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, NS, PLURAL, "pg", patch, _content_type=MERGE, _request_timeout=TIMEOUT
        )
    assert stale.value.status == 409
    # Sent without a merge-patch Content-Type, the dict goes as a JSON patch, which the API server refuses.
    with pytest.raises(ApiException) as wrong:
        await custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, NS, PLURAL, "pg", {"status": {"targetPrimary": "pg-2"}}, _request_timeout=TIMEOUT
        )
    assert wrong.value.status == 400
    assert len(sim.promotions) == 1


def _ready_replica(sim: KubeSim, name: str, other_than: str | None = None) -> bool:
    pod = sim.pod(name)
    if pod is None or pod["metadata"]["uid"] == other_than:
        return False
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])
    return ready and sim.profile.role_of(pod) == "replica"


async def test_a_failover_fault_goes_through_the_operator(sim: KubeSim) -> None:
    assert sim.apply_fault({"kind": "primary_change", "to": "pg-2"}) == {"primary": "pg-2"}

    await sim.wait_for(lambda: sim.primary() == "pg-2")

    assert [(p.primary, p.target, p.timeline) for p in sim.promotions] == [("pg-1", "pg-2", 2)]
    assert (sim.cnpg_cluster() or {})["status"]["currentPrimary"] == "pg-2"


def _restarted(sim: KubeSim, count: int, phases: list[str]) -> bool:
    """Every one of `count` instances restarted and the Cluster healthy again; each phase on the way, in `phases`."""
    phase = (sim.cnpg_cluster() or {})["status"]["phase"]
    if not phases or phases[-1] != phase:
        phases.append(phase)
    return len(sim.cnpg_restarts) == count and phase == HEALTHY


HEALTHY = "Cluster in healthy state"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


@pytest.mark.parametrize(
    ("method", "restarts", "phase", "primary"),
    [
        ("restart", [("pg-3", "replica"), ("pg-2", "replica"), ("pg-1", "primary")], "Primary instance is", "pg-1"),
        ("switchover", [("pg-3", "replica"), ("pg-2", "replica"), ("pg-1", "replica")], "Switchover in", "pg-2"),
    ],
)
async def test_the_restarted_at_annotation_rolls_the_replicas_one_at_a_time_then_the_primary(
    sim: KubeSim, api: client.ApiClient, method: str, restarts: list[tuple[str, str]], phase: str, primary: str
) -> None:
    sim.cnpg_spec(primaryUpdateMethod=method)
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in sim.members()}
    patch = {"metadata": {"annotations": {RESTARTED_AT: "2026-12-04T06:00:00Z"}}}
    custom: Any = client.CustomObjectsApi(api)  # the generated signature leaves out `_content_type`
    await custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "pg", patch, _content_type=MERGE, _request_timeout=TIMEOUT
    )
    seen: list[str] = []
    await sim.wait_for(lambda: _restarted(sim, 3, seen), within=20)

    assert [(r.pod, r.role) for r in sim.cnpg_restarts] == restarts
    assert seen[0] == HEALTHY and "Upgrading cluster" in seen and any(p.startswith(phase) for p in seen)
    assert seen[-1] == HEALTHY and sim.primary() == primary
    after = {p["metadata"]["name"]: p for p in sim.members()}
    assert all(after[name]["metadata"]["uid"] != uid for name, uid in before.items()), "each pod recreated"
    assert {p["metadata"]["annotations"][RESTARTED_AT] for p in after.values()} == {"2026-12-04T06:00:00Z"}
    assert (sim.pvc("pg-1") or {})["status"]["phase"] == "Bound"


async def test_a_supervised_cluster_waits_for_the_user_before_the_primary(sim: KubeSim) -> None:
    sim.cnpg_spec(primaryUpdateStrategy="supervised")
    sim.cnpg_restart("2026-12-04T06:00:00Z")

    await sim.wait_for(lambda: (sim.cnpg_cluster() or {})["status"]["phase"] == "Waiting for user action", within=20)

    assert [r.pod for r in sim.cnpg_restarts] == ["pg-3", "pg-2"]


async def test_an_instance_that_crash_loops_holds_the_rollout(sim: KubeSim) -> None:
    sim.crash_loop("pg-3")  # the running pod is not touched: its recreation crash-loops
    sim.cnpg_restart("2026-12-04T06:00:00Z")

    def crash_looping() -> bool:
        pod = sim.pod("pg-3") or {"status": {}}
        statuses = pod["status"].get("containerStatuses") or [{}]
        return ((statuses[0].get("state") or {}).get("waiting") or {}).get("reason") == "CrashLoopBackOff"

    await sim.wait_for(crash_looping, within=20)

    status = (sim.cnpg_cluster() or {})["status"]
    assert (status["phase"], status["phaseReason"]) == ("Upgrading cluster", "waiting for pg-3 to be back")
    assert [r.pod for r in sim.cnpg_restarts] == ["pg-3"]
