"""The simulated cluster, seen through the unmodified kubernetes_asyncio client over real HTTP.

Every object read here goes through the client's model deserialization, so these tests also prove the sim's
JSON carries the fields the client insists on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.conftest import wait_for
from tests.kube_sim import PROFILES, KubeSim

T = TypeVar("T")
NS = "db"
SELECTOR = "application=spilo,cluster-name=pg"
TIMEOUT = 5  # _request_timeout on every call, as the job will do


@pytest.fixture
async def sim() -> AsyncIterator[KubeSim]:
    async with KubeSim.running(profile="zalando") as running:
        yield running


async def connect(sim: KubeSim, tmp_path: Path) -> client.ApiClient:
    path = sim.write_kubeconfig(tmp_path / "kubeconfig", context="sim")
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(path), context="sim", client_configuration=cfg)
    return client.ApiClient(cfg)


@pytest.fixture
async def api(sim: KubeSim, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    async with await connect(sim, tmp_path) as api_client:
        yield api_client


@pytest.fixture
def core(api: client.ApiClient) -> Any:
    return client.CoreV1Api(api)


@pytest.fixture
def apps(api: client.ApiClient) -> Any:
    return client.AppsV1Api(api)


async def eventually(probe: Callable[[], Awaitable[T | None]], within: float = 5.0) -> T:
    """Poll like the job will: re-read through the API until `probe` returns something truthy."""
    result: T = await wait_for(probe, within)
    return result


async def read_pod(core: Any, name: str) -> Any:
    try:
        return await core.read_namespaced_pod(name, NS, _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def read_pvc(core: Any, name: str) -> Any:
    try:
        return await core.read_namespaced_persistent_volume_claim(name, NS, _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def is_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def names(items: list[Any]) -> list[str]:
    return sorted(item.metadata.name for item in items)


async def pod_names(core: Any, **kwargs: Any) -> list[str]:
    pods = await core.list_namespaced_pod(NS, _request_timeout=TIMEOUT, **kwargs)
    return names(pods.items)


def status_body(exc: ApiException) -> dict[str, Any]:
    assert exc.body is not None
    body: dict[str, Any] = json.loads(exc.body)
    return body


# reads and selectors


async def test_label_selectors_pick_members_by_cluster_and_role(core: Any) -> None:
    assert await pod_names(core, label_selector=SELECTOR) == ["pg-0", "pg-1", "pg-2"]
    assert await pod_names(core, label_selector=f"{SELECTOR},spilo-role=master") == ["pg-0"]
    assert await pod_names(core, label_selector="spilo-role!=master") == ["pg-1", "pg-2"]
    assert await pod_names(core, label_selector="spilo-role in (replica, standby)") == ["pg-1", "pg-2"]
    assert await pod_names(core, label_selector="spilo-role notin (replica)") == ["pg-0"]
    assert await pod_names(core, label_selector="spilo-role") == ["pg-0", "pg-1", "pg-2"]
    assert await pod_names(core, label_selector="!spilo-role") == []
    assert await pod_names(core, field_selector="metadata.name=pg-1") == ["pg-1"]
    everywhere = await core.list_pod_for_all_namespaces(label_selector=SELECTOR, _request_timeout=TIMEOUT)
    assert names(everywhere.items) == ["pg-0", "pg-1", "pg-2"]
    assert int(everywhere.metadata.resource_version) > 0


async def test_seeded_objects_carry_metadata_owners_and_status(core: Any, apps: Any) -> None:
    sts = await apps.read_namespaced_stateful_set("pg", NS, _request_timeout=TIMEOUT)
    assert sts.status.current_revision == sts.status.update_revision
    assert (sts.status.replicas, sts.status.ready_replicas) == (3, 3)
    assert sts.spec.volume_claim_templates[0].metadata.name == "data"
    pod = await core.read_namespaced_pod("pg-1", NS, _request_timeout=TIMEOUT)
    owner = pod.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == ("StatefulSet", "pg", sts.metadata.uid, True)
    assert pod.metadata.uid and pod.metadata.creation_timestamp and pod.metadata.resource_version
    assert is_ready(pod) and pod.status.container_statuses[0].ready
    assert [v.persistent_volume_claim.claim_name for v in pod.spec.volumes] == ["data-pg-1"]
    pvcs = await core.list_namespaced_persistent_volume_claim(NS, _request_timeout=TIMEOUT)
    assert names(pvcs.items) == ["data-pg-0", "data-pg-1", "data-pg-2"]
    assert {p.status.phase for p in pvcs.items} == {"Bound"}
    namespaces = await core.list_namespace(_request_timeout=TIMEOUT)
    assert names(namespaces.items) == [NS]


async def test_invalid_label_selector_is_a_400_status(core: Any) -> None:
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_pod(NS, label_selector="a in (b", _request_timeout=TIMEOUT)
    assert caught.value.status == 400
    assert status_body(caught.value)["reason"] == "BadRequest"


async def test_missing_pod_is_404_status_on_get_and_delete(core: Any) -> None:
    for call in (core.read_namespaced_pod, core.delete_namespaced_pod):
        with pytest.raises(ApiException) as caught:
            await call("pg-9", NS, _request_timeout=TIMEOUT)
        assert caught.value.status == 404
        assert status_body(caught.value) == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": 'pods "pg-9" not found',
            "reason": "NotFound",
            "details": {"name": "pg-9", "kind": "pods"},
            "code": 404,
        }


async def test_delete_with_stale_uid_precondition_is_409_and_changes_nothing(core: Any) -> None:
    pod = await core.read_namespaced_pod("pg-1", NS, _request_timeout=TIMEOUT)
    body = client.V1DeleteOptions(grace_period_seconds=5, preconditions=client.V1Preconditions(uid="stale-uid"))
    with pytest.raises(ApiException) as caught:
        await core.delete_namespaced_pod("pg-1", NS, body=body, _request_timeout=TIMEOUT)
    assert caught.value.status == 409
    message = status_body(caught.value)["message"]
    assert f"Precondition failed: UID in precondition: stale-uid, UID in object meta: {pod.metadata.uid}" in message
    after = await core.read_namespaced_pod("pg-1", NS, _request_timeout=TIMEOUT)
    assert after.metadata.deletion_timestamp is None


# the pg-rebuild flow


async def test_rebuild_replica_storage_end_to_end_in_under_two_seconds(core: Any) -> None:
    started = asyncio.get_running_loop().time()
    old_pod = await core.read_namespaced_pod("pg-1", NS, _request_timeout=TIMEOUT)
    old_pvc = await core.read_namespaced_persistent_volume_claim("data-pg-1", NS, _request_timeout=TIMEOUT)

    precondition = client.V1Preconditions(uid=old_pvc.metadata.uid)
    await core.delete_namespaced_persistent_volume_claim(
        "data-pg-1", NS, body=client.V1DeleteOptions(preconditions=precondition), _request_timeout=TIMEOUT
    )
    terminating = await core.read_namespaced_persistent_volume_claim("data-pg-1", NS, _request_timeout=TIMEOUT)
    assert terminating.metadata.deletion_timestamp is not None
    assert terminating.metadata.finalizers == ["kubernetes.io/pvc-protection"]
    await asyncio.sleep(0.2)  # in use by pg-1: pvc-protection must hold it
    assert await read_pvc(core, "data-pg-1") is not None

    body = client.V1DeleteOptions(
        grace_period_seconds=30, preconditions=client.V1Preconditions(uid=old_pod.metadata.uid)
    )
    deleted = await core.delete_namespaced_pod("pg-1", NS, body=body, _request_timeout=TIMEOUT)
    assert deleted.metadata.deletion_timestamp is not None

    async def old_gone() -> bool:
        pod, pvc = await read_pod(core, "pg-1"), await read_pvc(core, "data-pg-1")
        return (pod is None or pod.metadata.uid != old_pod.metadata.uid) and (
            pvc is None or pvc.metadata.uid != old_pvc.metadata.uid
        )

    await eventually(old_gone)

    async def scheduled() -> Any:
        pod, pvc = await read_pod(core, "pg-1"), await read_pvc(core, "data-pg-1")
        if pod is None or pvc is None or pvc.status.phase != "Bound" or not pod.spec.node_name:
            return None
        return pod

    new_pod = await eventually(scheduled)
    assert new_pod.metadata.uid != old_pod.metadata.uid
    assert new_pod.metadata.owner_references[0].name == "pg"

    async def ready_replica() -> Any:
        pod = await read_pod(core, "pg-1")
        return pod if pod and is_ready(pod) and pod.metadata.labels.get("spilo-role") == "replica" else None

    rebuilt = await eventually(ready_replica)
    assert rebuilt.metadata.uid == new_pod.metadata.uid
    assert asyncio.get_running_loop().time() - started < 2.0
    assert await pod_names(core, label_selector="spilo-role=master") == ["pg-0"]


async def test_new_member_gets_role_label_only_once_ready(sim: KubeSim, core: Any) -> None:
    await core.delete_namespaced_pod("pg-2", NS, grace_period_seconds=0, _request_timeout=TIMEOUT)
    seen: list[tuple[bool, str | None]] = []

    async def ready() -> bool:
        pod = await read_pod(core, "pg-2")
        if pod is not None:
            seen.append((is_ready(pod), pod.metadata.labels.get("spilo-role")))
        return pod is not None and seen[-1] == (True, "replica")

    await eventually(ready)
    assert (False, None) in seen
    assert (False, "replica") not in seen


async def test_statefulset_is_ordered_ready(sim: KubeSim, core: Any) -> None:
    sim.never_ready("pg-1")
    for name in ("pg-1", "pg-2"):
        await core.delete_namespaced_pod(name, NS, grace_period_seconds=0, _request_timeout=TIMEOUT)

    async def pg1_running() -> bool:
        pod = await read_pod(core, "pg-1")
        return pod is not None and pod.status.phase == "Running"

    await eventually(pg1_running)
    await asyncio.sleep(0.4)
    assert await read_pod(core, "pg-2") is None  # not while pg-1 is not Ready
    sim.set_behaviour("pg-1", None)
    await eventually(lambda: read_pod(core, "pg-2"))


# watch


async def test_watch_streams_added_modified_deleted(sim: KubeSim, core: Any) -> None:
    listed = await core.list_namespaced_pod(NS, _request_timeout=TIMEOUT)
    events: list[tuple[str, str, str]] = []

    async def consume() -> None:
        async with watch.Watch() as w:
            stream = w.stream(
                core.list_namespaced_pod, NS, resource_version=listed.metadata.resource_version, timeout_seconds=5
            )
            async for event in stream:
                pod = event["object"]
                assert isinstance(pod, client.V1Pod)
                events.append((event["type"], pod.metadata.name, pod.metadata.uid))
                if event["type"] == "ADDED":
                    return

    consumer = asyncio.create_task(consume())
    await sim.wait_for(lambda: sim.store.watching > 0, within=2)  # the events below reach a live watch
    old = await core.delete_namespaced_pod("pg-2", NS, grace_period_seconds=1, _request_timeout=TIMEOUT)
    await asyncio.wait_for(consumer, 5)
    types = [t for t, _, _ in events]
    assert types[0] == "MODIFIED" and "DELETED" in types and types[-1] == "ADDED"
    assert events[types.index("DELETED")][2] == old.metadata.uid
    assert events[-1][1] == "pg-2" and events[-1][2] != old.metadata.uid


async def test_watch_without_resource_version_starts_with_current_state(core: Any) -> None:
    async with watch.Watch() as w:
        stream = w.stream(core.list_namespaced_pod, NS, label_selector="spilo-role=replica", timeout_seconds=1)
        seen = [(e["type"], e["object"].metadata.name) async for e in stream]
    assert seen == [("ADDED", "pg-1"), ("ADDED", "pg-2")]


async def test_watch_from_compacted_resource_version_is_410(sim: KubeSim, core: Any) -> None:
    sim.compact()
    with pytest.raises(ApiException) as caught:
        async with watch.Watch() as w:
            async for _ in w.stream(core.list_namespaced_pod, NS, resource_version="1", timeout_seconds=5):
                pass
    assert caught.value.status == 410
    assert "too old resource version" in str(caught.value.reason)


async def test_watch_closes_at_timeout_seconds(core: Any) -> None:
    listed = await core.list_namespaced_persistent_volume_claim(NS, _request_timeout=TIMEOUT)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with watch.Watch() as w:
        rv = listed.metadata.resource_version
        stream = w.stream(core.list_namespaced_persistent_volume_claim, NS, resource_version=rv, timeout_seconds=1)
        assert [e async for e in stream] == []
    assert 0.9 < loop.time() - started < 2.0


async def test_cut_watch_ends_the_stream_early(sim: KubeSim, core: Any) -> None:
    sim.cut_watch("pods", after_events=1)
    async with watch.Watch() as w:
        seen = [e["type"] async for e in w.stream(core.list_namespaced_pod, NS, timeout_seconds=5)]
    assert seen == ["ADDED"]

    async def consume() -> list[str]:
        async with watch.Watch() as w:
            rv = str(sim.store.rv)
            return [
                e["type"] async for e in w.stream(core.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=5)
            ]

    consumer = asyncio.create_task(consume())
    await sim.wait_for(lambda: sim.store.watching > 0, within=2)
    assert sim.cut_watches() == 1
    assert await asyncio.wait_for(consumer, 2) == []


# request faults


async def test_http_500_once_then_success(sim: KubeSim, core: Any) -> None:
    sim.fail(500, verb="get", resource="pods", name="pg-1", times=1)
    with pytest.raises(ApiException) as caught:
        await core.read_namespaced_pod("pg-1", NS, _request_timeout=TIMEOUT)
    assert caught.value.status == 500
    assert status_body(caught.value)["reason"] == "InternalError"
    assert (await core.read_namespaced_pod("pg-1", NS, _request_timeout=TIMEOUT)).metadata.name == "pg-1"


async def test_429_carries_retry_after(sim: KubeSim, core: Any) -> None:
    sim.fail(429, verb="list", resource="pods", retry_after=2, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as caught:
            await core.list_namespaced_pod(NS, _request_timeout=TIMEOUT)
        assert caught.value.status == 429
        assert caught.value.headers is not None and caught.value.headers["Retry-After"] == "2"
        assert status_body(caught.value)["details"]["retryAfterSeconds"] == 2
    assert len(await pod_names(core)) == 3


async def test_failed_delete_changes_nothing(sim: KubeSim, core: Any) -> None:
    sim.fail(503, verb="delete", resource="pods", name="pg-1")
    with pytest.raises(ApiException) as caught:
        await core.delete_namespaced_pod("pg-1", NS, grace_period_seconds=0, _request_timeout=TIMEOUT)
    assert caught.value.status == 503
    pod = await core.read_namespaced_pod("pg-1", NS, _request_timeout=TIMEOUT)
    assert pod.metadata.deletion_timestamp is None and is_ready(pod)


async def test_injected_latency_delays_the_response(sim: KubeSim, core: Any) -> None:
    sim.slow(0.3, verb="get", resource="pods", times=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await core.read_namespaced_pod("pg-0", NS, _request_timeout=TIMEOUT)
    assert loop.time() - started >= 0.3
    with pytest.raises(TimeoutError):
        sim.slow(0.4, verb="get", resource="pods", times=1)
        await core.read_namespaced_pod("pg-0", NS, _request_timeout=0.2)


# pod, PVC and StatefulSet faults


async def replace_pod(core: Any, name: str) -> None:
    await core.delete_namespaced_pod(name, NS, grace_period_seconds=0, _request_timeout=TIMEOUT)


async def test_crash_loop_shows_waiting_reason_and_climbing_restarts(sim: KubeSim, core: Any) -> None:
    sim.crash_loop("pg-1")
    await replace_pod(core, "pg-1")

    async def restarts_at_least(n: int) -> Any:
        pod = await read_pod(core, "pg-1")
        statuses = (pod.status.container_statuses or []) if pod else []
        if statuses and statuses[0].state.waiting and statuses[0].restart_count >= n:
            return pod
        return None

    first = await eventually(lambda: restarts_at_least(1))
    status = first.status.container_statuses[0]
    assert status.state.waiting.reason == "CrashLoopBackOff"
    assert status.last_state.terminated.exit_code == 1
    later = await eventually(lambda: restarts_at_least(status.restart_count + 2))
    assert later.status.container_statuses[0].state.waiting.reason == "CrashLoopBackOff"
    assert not is_ready(later) and "spilo-role" not in later.metadata.labels


async def test_image_pull_errors_alternate(sim: KubeSim, core: Any) -> None:
    sim.image_pull_error("pg-1")
    await replace_pod(core, "pg-1")
    reasons: set[str] = set()

    async def both_seen() -> bool:
        pod = await read_pod(core, "pg-1")
        waiting = pod.status.container_statuses[0].state.waiting if pod and pod.status.container_statuses else None
        if waiting:
            reasons.add(waiting.reason)
            assert pod.status.phase == "Pending"
        return reasons >= {"ErrImagePull", "ImagePullBackOff"}

    await eventually(both_seen)
    assert reasons <= {"ContainerCreating", "ErrImagePull", "ImagePullBackOff"}


async def test_create_container_config_error(sim: KubeSim, core: Any) -> None:
    sim.config_error("pg-1")
    await replace_pod(core, "pg-1")

    async def config_error() -> Any:
        pod = await read_pod(core, "pg-1")
        waiting = pod.status.container_statuses[0].state.waiting if pod and pod.status.container_statuses else None
        return waiting if waiting and waiting.reason == "CreateContainerConfigError" else None

    waiting = await eventually(config_error)
    assert "not found" in waiting.message


async def test_unschedulable_pod_reports_pod_scheduled_false(sim: KubeSim, core: Any) -> None:
    sim.unschedulable("pg-1")
    await replace_pod(core, "pg-1")

    async def unschedulable() -> Any:
        pod = await read_pod(core, "pg-1")
        conditions = pod.status.conditions or [] if pod else []
        return next((c for c in conditions if c.type == "PodScheduled" and c.status == "False"), None)

    cond = await eventually(unschedulable)
    assert cond.reason == "Unschedulable"
    assert cond.message.startswith("0/3 nodes are available:")
    pod = await core.read_namespaced_pod("pg-1", NS, _request_timeout=TIMEOUT)
    assert pod.status.phase == "Pending" and pod.spec.node_name is None


async def test_never_ready_pod_runs_without_ready_or_role(sim: KubeSim, core: Any) -> None:
    sim.never_ready("pg-1")
    await replace_pod(core, "pg-1")

    async def running() -> Any:
        pod = await read_pod(core, "pg-1")
        return pod if pod and pod.status.phase == "Running" else None

    await eventually(running)
    await asyncio.sleep(sim.speed.ready * 3)
    pod = await core.read_namespaced_pod("pg-1", NS, _request_timeout=TIMEOUT)
    assert not is_ready(pod) and "spilo-role" not in pod.metadata.labels


async def test_member_not_ready_lowers_ready_replicas(sim: KubeSim, core: Any, apps: Any) -> None:
    sim.not_ready("pg-2")

    async def two_ready() -> bool:
        sts = await apps.read_namespaced_stateful_set("pg", NS, _request_timeout=TIMEOUT)
        return bool(sts.status.ready_replicas == 2)

    await eventually(two_ready)
    assert not is_ready(await core.read_namespaced_pod("pg-2", NS, _request_timeout=TIMEOUT))


async def test_stuck_pvc_stays_terminating_and_blocks_the_new_pod(sim: KubeSim, core: Any) -> None:
    sim.stuck_pvc("data-pg-1")
    await core.delete_namespaced_persistent_volume_claim("data-pg-1", NS, _request_timeout=TIMEOUT)
    await core.delete_namespaced_pod("pg-1", NS, grace_period_seconds=1, _request_timeout=TIMEOUT)

    async def pod_gone() -> bool:
        return await read_pod(core, "pg-1") is None

    await eventually(pod_gone)
    await asyncio.sleep(0.3)
    pvc = await core.read_namespaced_persistent_volume_claim("data-pg-1", NS, _request_timeout=TIMEOUT)
    assert pvc.metadata.deletion_timestamp is not None
    assert pvc.metadata.finalizers == ["kubernetes.io/pvc-protection"]
    assert await read_pod(core, "pg-1") is None  # the StatefulSet waits for the claim to go
    sim.clear_faults()

    async def recreated() -> Any:
        pod = await read_pod(core, "pg-1")
        return pod if pod and is_ready(pod) else None

    await eventually(recreated)


async def test_primary_change_moves_the_role_label(sim: KubeSim, core: Any) -> None:
    assert sim.change_primary("pg-2") == "pg-2"
    assert await pod_names(core, label_selector="spilo-role=master") == ["pg-2"]
    assert await pod_names(core, label_selector="spilo-role=replica") == ["pg-0", "pg-1"]


async def test_rollout_in_progress_shows_in_revisions(sim: KubeSim, apps: Any) -> None:
    sim.start_rollout("pg")
    sts = await apps.read_namespaced_stateful_set("pg", NS, _request_timeout=TIMEOUT)
    assert sts.status.current_revision != sts.status.update_revision


# black-box controls


async def test_admin_endpoint_injects_faults_and_reports_state(sim: KubeSim, core: Any) -> None:
    async with aiohttp.ClientSession(base_url=sim.url) as http:
        spec = {"kind": "http", "status": 500, "verb": "list", "resource": "pods", "times": 1}
        async with http.post("/_sim/faults", json=spec) as resp:
            assert resp.status == 200
        async with http.post("/_sim/faults", json={"kind": "pod", "name": "pg-1", "behaviour": "crash_loop"}) as resp:
            assert resp.status == 200
        async with http.post("/_sim/faults", json={"kind": "primary_change", "to": "pg-1"}) as resp:
            assert (await resp.json()) == {"primary": "pg-1"}
        async with http.post("/_sim/faults", json={"kind": "nonsense"}) as resp:
            assert resp.status == 400
            assert "unknown fault kind 'nonsense'; the kinds are http, latency, watch_cut," in await resp.text()
        async with http.post("/_sim/faults", json={"kind": "pod", "name": "pg-1", "behaviour": "crashloop"}) as resp:
            assert resp.status == 400
            assert "unknown pod behaviour 'crashloop'; they are not_ready, crash_loop," in await resp.text()
        with pytest.raises(ApiException) as caught:
            await core.list_namespaced_pod(NS, _request_timeout=TIMEOUT)
        assert caught.value.status == 500
        async with http.get("/_sim/state") as resp:
            state = await resp.json()
        assert [p["metadata"]["name"] for p in state["objects"]["pods"]] == ["pg-0", "pg-1", "pg-2"]
        assert state["faults"]["pods"] == {"db/pg-1": "crash_loop"}
        async with http.delete("/_sim/faults") as resp:
            assert resp.status == 200
    assert sim.faults.pods == {} and sim.primary() == "pg-1"
    assert sim.faults.pod_behaviour(NS, "pg-1") is None


@pytest.mark.parametrize("profile", sorted(PROFILES))
async def test_profiles_label_the_seeded_cluster(profile: str, tmp_path: Path) -> None:
    conventions = PROFILES[profile]
    async with KubeSim.running(profile=profile) as sim, await connect(sim, tmp_path) as api:
        core = client.CoreV1Api(api)
        members = await core.list_namespaced_pod(NS, label_selector=conventions.selector("pg"), _request_timeout=5)
        # CloudNativePG counts its instances' serials from 1; a StatefulSet its ordinals from 0.
        first = 1 if profile == "cnpg" else 0
        assert names(members.items) == [f"pg-{n}" for n in range(first, first + 3)]
        for role_label in conventions.role_labels:
            primary = await pod_names(core, label_selector=f"{role_label}={conventions.primary}")
            assert primary == [f"pg-{first}"]
            replicas = [f"pg-{first + 1}", f"pg-{first + 2}"]
            assert await pod_names(core, label_selector=f"{role_label}=replica") == replicas


async def test_cli_serves_a_seeded_cluster_and_stops_on_sigterm(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    args = ["-m", "tests.kube_sim", "--port", "0", "--speed", "fast", "--kubeconfig", str(kubeconfig)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=Path(__file__).parent.parent, stderr=asyncio.subprocess.PIPE, env=dict(os.environ)
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(10):
            while b"kube-sim ready" not in (line := await proc.stderr.readline()):
                assert line, "kube-sim exited before it was ready"
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(kubeconfig), context="sim", client_configuration=cfg)
        async with client.ApiClient(cfg) as api:
            pods = await client.CoreV1Api(api).list_namespaced_pod(NS, label_selector=SELECTOR, _request_timeout=5)
        assert names(pods.items) == ["pg-0", "pg-1", "pg-2"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.stderr.read()
        code = await asyncio.wait_for(proc.wait(), 10)
    assert code == 0
