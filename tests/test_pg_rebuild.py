"""pg-rebuild end to end: the real API and the real arq worker against the simulated cluster over real HTTP.

Happy path, refusals (nothing deleted), dry run, another label profile, and params rejected at submit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from jobs.pg_rebuild import PgRebuildSettings
from service.settings import Settings
from tests.conftest import (
    TEST_REGISTRY,
    api_client,
    headers,
    kube_registry,
    kube_settings_for,
    running_worker,
    shipped_role_cluster,
    wait_for_status,
)
from tests.conftest import submit as submit_job
from tests.kube_sim import KubeSim

STEPS = [
    "preflight",
    "check-cluster-health",
    "delete-pvcs",
    "delete-pod",
    "wait-old-gone",
    "wait-scheduled",
    "wait-ready",
    "post-check",
]


def world(sim: KubeSim) -> dict[str, tuple[str, bool]]:
    """Every pod and PVC of the sample cluster: uid and whether it is being deleted."""
    state: dict[str, tuple[str, bool]] = {}
    for resource in ("pods", "persistentvolumeclaims"):
        for obj in sim.store.objects(resource, "db"):
            meta = obj["metadata"]
            state[f"{resource}/{meta['name']}"] = (meta["uid"], bool(meta.get("deletionTimestamp")))
    return state


async def submit(client: httpx.AsyncClient, **params: Any) -> str:
    return await submit_job(client, "pg-rebuild", **({"namespace": "db", "cluster": "pg", "pod": "pg-1"} | params))


async def rebuild(
    client: httpx.AsyncClient, settings: Settings, kube: PgRebuildSettings, within: float = 10, **params: Any
) -> Any:
    """Run a pg-rebuild to its end on a worker whose pg-rebuild settings are `kube`."""
    async with running_worker(settings, kube_registry(kube)):
        job_id = await submit(client, **params)
        job = await wait_for_status(client, job_id, "success", "failed", within=within)
        return job


def steps(job: Any) -> dict[str, Any]:
    return {s["name"]: s for s in job["steps"]}


async def test_rebuilds_a_replica_with_new_pod_and_new_storage(
    client: httpx.AsyncClient,
    settings: Settings,
    kube_settings: PgRebuildSettings,
    kube_sim: KubeSim,
    db: asyncpg.Connection,
) -> None:
    before = world(kube_sim)

    job = await rebuild(client, settings, kube_settings)

    assert job["status"] == "success", job
    assert job["target"] == "k8s/default/db/pg"
    assert [(s["name"], s["status"]) for s in job["steps"]] == [(name, "success") for name in STEPS]
    after = world(kube_sim)
    old_pod, old_pvc = before["pods/pg-1"][0], before["persistentvolumeclaims/data-pg-1"][0]
    assert after["pods/pg-1"][0] != old_pod and after["persistentvolumeclaims/data-pg-1"][0] != old_pvc
    for untouched in ("pods/pg-0", "pods/pg-2", "persistentvolumeclaims/data-pg-0", "persistentvolumeclaims/data-pg-2"):
        assert after[untouched] == before[untouched]
    assert kube_sim.primary() == "pg-0"

    detail = {name: s["detail"] for name, s in steps(job).items()}
    assert detail["preflight"].startswith(f"pod pg-1 (uid {old_pod}, node node-b) of StatefulSet pg at revision pg-")
    assert f"data PVCs: data-pg-1 (uid {old_pvc}, 10Gi, Bound)" in detail["preflight"]
    assert detail["check-cluster-health"] == (
        "primary pg-0 healthy; 2/2 other members ready (pg-0, pg-2); pg-1 is replica; "
        "Patroni: pg-0 leads on timeline 1; pg-2 (streaming, timeline 1, lag 0 B)"
    )
    assert (
        detail["delete-pvcs"]
        == f"deleted PVC data-pg-1 (uid {old_pvc}) (each stays Terminating until pod pg-1 is gone)"
    )
    assert detail["delete-pod"] == f"deleted pod pg-1 (uid {old_pod}, node node-b) with grace period 30s"
    assert detail["wait-old-gone"].startswith("old pod pg-1 and PVCs data-pg-1 gone")
    assert detail["wait-scheduled"].startswith(f"pod pg-1 (uid {after['pods/pg-1'][0]}) scheduled on node-b")
    assert detail["wait-ready"].startswith(
        f"pod pg-1 (uid {after['pods/pg-1'][0]}) Ready as replica, streaming from pg-0 (timeline 1, lag 0 B), after "
    )
    assert detail["post-check"] == (
        f"primary pg-0 unchanged; 3/3 members ready; pg-1 rebuilt (uid {old_pod} -> {after['pods/pg-1'][0]})"
    )

    # While it waited, the step said what for and what it saw, in the shape the old service used.
    progress = await db.fetch(
        "SELECT detail FROM ops_job_event WHERE job_id = $1 AND kind = 'progress' AND step = 'wait-ready'",
        job["job_id"],
    )
    seen = [row["detail"] for row in progress]
    assert seen and all(d.startswith("waiting for pods, remaining: pg-1 (") for d in seen), seen
    assert len(seen) == len(set(seen)), "progress is written only when it changes"


async def test_refuses_the_primary_and_deletes_nothing(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    before = world(kube_sim)

    job = await rebuild(client, settings, kube_settings, pod="pg-0")

    assert job["status"] == "failed"
    health = steps(job)["check-cluster-health"]
    assert health["detail"] == (
        "error: Refused: pod pg-0 is the primary (spilo-role=master); only replicas are rebuilt"
    )
    assert steps(job)["delete-pvcs"]["status"] == "pending"
    assert world(kube_sim) == before


async def test_refuses_when_another_member_is_not_ready_and_deletes_nothing(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    kube_sim.not_ready("pg-2")
    await kube_sim.wait_for(lambda: not _ready(kube_sim, "pg-2"))
    before = world(kube_sim)

    job = await rebuild(client, settings, kube_settings)

    assert job["status"] == "failed"
    detail = steps(job)["check-cluster-health"]["detail"]
    assert detail.startswith("error: Refused: other members not ready: pg-2 (Running, not Ready")
    assert world(kube_sim) == before


async def test_refuses_a_statefulset_mid_rollout_and_deletes_nothing(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    kube_sim.start_rollout("pg")
    before = world(kube_sim)

    job = await rebuild(client, settings, kube_settings)

    assert job["status"] == "failed"
    detail = steps(job)["preflight"]["detail"]
    assert detail.startswith("error: Refused: StatefulSet pg is mid-rollout (currentRevision pg-")
    assert steps(job)["check-cluster-health"]["status"] == "pending"
    assert world(kube_sim) == before


async def test_dry_run_reports_what_it_would_delete_and_deletes_nothing(
    client: httpx.AsyncClient, settings: Settings, kube_settings: PgRebuildSettings, kube_sim: KubeSim
) -> None:
    before = world(kube_sim)
    old_pod, old_pvc = before["pods/pg-1"][0], before["persistentvolumeclaims/data-pg-1"][0]

    job = await rebuild(client, settings, kube_settings, dry_run=True)

    assert job["status"] == "success", job
    detail = {name: s["detail"] for name, s in steps(job).items()}
    assert detail["delete-pvcs"] == f"dry run: would delete PVC data-pg-1 (uid {old_pvc}, 10Gi, Bound)"
    assert detail["delete-pod"] == f"dry run: would delete pod pg-1 (uid {old_pod}, node node-b) with grace period 30s"
    for name in ("wait-old-gone", "wait-scheduled", "wait-ready"):
        assert detail[name] == "dry run: nothing deleted, nothing to wait for"
    assert detail["post-check"].endswith(f"pg-1 untouched (dry run) (uid {old_pod})")
    assert world(kube_sim) == before


@pytest.mark.parametrize("profile", ["patroni", "stackgres"])
async def test_rebuilds_with_another_label_profile(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path, profile: str
) -> None:
    async with shipped_role_cluster(profile) as sim:
        before = world(sim)
        job = await rebuild(client, settings, kube_settings_for(sim, tmp_path / "kubeconfig"), profile=profile)

        assert job["status"] == "success", job
        assert job["params"]["profile"] == profile
        assert world(sim)["pods/pg-1"][0] != before["pods/pg-1"][0]
        assert sim.primary() == "pg-0"
        assert steps(job)["check-cluster-health"]["detail"].startswith("primary pg-0 healthy; 2/2 other members ready")


async def test_profile_defaults_to_the_configured_one(settings: Settings) -> None:
    configured = TEST_REGISTRY.with_settings({"pg-rebuild": PgRebuildSettings(pg_rebuild_profile="patroni")})
    async with api_client(settings, configured, headers=headers("writer")) as client:
        job_id = await submit(client, dry_run=True)
        job = (await client.get(f"/ops/jobs/{job_id}")).json()

    assert job["params"]["profile"] == "patroni" and job["params"]["context"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"namespace": "DB"}, "namespace"),
        ({"namespace": "db_1"}, "namespace"),
        ({"cluster": "-pg"}, "cluster"),
        ({"cluster": "p" * 64}, "cluster"),
        ({"pod": "pg-1."}, "pod"),
        ({"pod": "pg 1"}, "pod"),
        ({"profile": "crunchy"}, "profile"),
        ({"context": "prod"}, "context"),
        ({"ready_timeout_s": 0}, "ready_timeout_s"),
        ({"surprise": 1}, "surprise"),
    ],
)
async def test_bad_params_are_a_422_and_write_nothing(
    client: httpx.AsyncClient, db: asyncpg.Connection, params: dict[str, Any], field: str
) -> None:
    body = {"namespace": "db", "cluster": "pg", "pod": "pg-1"} | params

    response = await client.post("/ops/jobs/pg-rebuild", json=body)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_params"
    assert [d["field"] for d in error["details"]] == [field]
    assert await db.fetchval("SELECT count(*) FROM ops_job") == 0


async def test_context_must_be_one_of_the_allowed(settings: Settings, db: asyncpg.Connection) -> None:
    allowed = TEST_REGISTRY.with_settings({"pg-rebuild": PgRebuildSettings(kube_contexts=("sim", "staging"))})
    async with api_client(settings, allowed, headers=headers("writer")) as client:
        refused = await client.post(
            "/ops/jobs/pg-rebuild", json={"namespace": "db", "cluster": "pg", "pod": "pg-1", "context": "prod"}
        )
        defaulted = await client.post("/ops/jobs/pg-rebuild", json={"namespace": "db", "cluster": "pg", "pod": "pg-1"})
        named = await client.post(
            "/ops/jobs/pg-rebuild", json={"namespace": "db", "cluster": "pg", "pod": "pg-2", "context": "staging"}
        )

    assert refused.status_code == 422
    assert "context 'prod' is not allowed (APIOPS_KUBE_CONTEXTS: sim, staging)" in refused.json()["error"]["message"]
    assert defaulted.status_code == 202 and defaulted.json()["target"] == "k8s/sim/db/pg"
    assert named.status_code == 202 and named.json()["target"] == "k8s/staging/db/pg"
    assert await db.fetchval("SELECT count(*) FROM ops_job") == 2


def _ready(sim: KubeSim, name: str) -> bool:
    pod = sim.pod(name)
    conditions = (pod or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
