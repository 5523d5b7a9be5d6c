"""The simulated cluster enforces a Role as kube-apiserver does: requests are authorized by verb, group, resource,
subresource and namespace, and refused with the API server's own 403 Status. The shipped worker Role
(deploy/worker-rbac.yaml) is what every pg-rebuild test runs under (conftest's `shipped_role_cluster`); here it is
shown to refuse what it does not grant, and to grant nothing that a rebuild does not use."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from jobs.pg_rebuild import PgRebuildSettings
from service.settings import Settings
from tests.conftest import kube_registry, running_worker, shipped_role_cluster, submit, wait_for_status
from tests.kube_sim import KubeSim
from tests.kube_sim.rbac import Attributes, Rbac, attributes

USER = "system:serviceaccount:apiops:apiops-worker"


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/db/pods/pg-1", "", ("get", "", "db", "pods", "", "pg-1")),
        ("GET", "/api/v1/namespaces/db/pods", "labelSelector=a%3Db", ("list", "", "db", "pods", "", "")),
        ("GET", "/api/v1/namespaces/db/pods", "watch=True", ("watch", "", "db", "pods", "", "")),
        ("GET", "/api/v1/namespaces/db/pods", "watch=false", ("list", "", "db", "pods", "", "")),
        ("GET", "/api/v1/watch/namespaces/db/pods", "", ("watch", "", "db", "pods", "", "")),
        ("GET", "/api/v1/pods", "fieldSelector=metadata.name%3Dpg-1", ("list", "", "", "pods", "", "pg-1")),
        ("POST", "/api/v1/namespaces/db/pods", "", ("create", "", "db", "pods", "", "")),
        ("PUT", "/api/v1/namespaces/db/pods/pg-1", "", ("update", "", "db", "pods", "", "pg-1")),
        ("PATCH", "/api/v1/namespaces/db/pods/pg-1", "", ("patch", "", "db", "pods", "", "pg-1")),
        ("DELETE", "/api/v1/namespaces/db/pods/pg-1", "", ("delete", "", "db", "pods", "", "pg-1")),
        ("DELETE", "/api/v1/namespaces/db/pods", "", ("deletecollection", "", "db", "pods", "", "")),
        ("GET", "/api/v1/namespaces/db/pods/pg-1/log", "", ("get", "", "db", "pods", "log", "pg-1")),
        ("POST", "/api/v1/namespaces/db/pods/pg-1/eviction", "", ("create", "", "db", "pods", "eviction", "pg-1")),
        ("GET", "/apis/apps/v1/namespaces/db/statefulsets/pg", "", ("get", "apps", "db", "statefulsets", "", "pg")),
        ("GET", "/api/v1/namespaces/db", "", ("get", "", "db", "namespaces", "", "db")),
        ("GET", "/api/v1/namespaces/db/status", "", ("get", "", "db", "namespaces", "status", "db")),
        (
            "POST",
            "/api/v1/namespaces/db/pods/pg-0:8008/proxy/switchover",
            "",
            ("create", "", "db", "pods", "proxy", "pg-0:8008"),
        ),
        (
            "PATCH",
            "/apis/postgresql.cnpg.io/v1/namespaces/db/clusters/pg/status",
            "",
            ("patch", "postgresql.cnpg.io", "db", "clusters", "status", "pg"),
        ),
    ],
)
def test_requests_map_to_verbs_and_resources_as_the_api_server_maps_them(
    method: str, path: str, query: str, expected: tuple[str, str, str, str, str, str]
) -> None:
    got = attributes(method, path, query)
    assert got.resource_request
    assert (got.verb, got.api_group, got.namespace, got.resource, got.subresource, got.name) == expected


def test_non_resource_paths_are_paths() -> None:
    assert attributes("GET", "/version") == Attributes(verb="get", path="/version")
    assert not attributes("GET", "/apis/apps").resource_request


def test_the_shipped_role_grants_exactly_what_the_job_types_call() -> None:
    rbac = Rbac.load()
    assert rbac.user == USER
    assert rbac.granted() == {
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "delete"),
        ("", "pods/proxy", "get"),
        ("", "pods/proxy", "create"),
        ("", "persistentvolumeclaims", "get"),
        ("", "persistentvolumeclaims", "delete"),
        ("apps", "statefulsets", "get"),
        ("postgresql.cnpg.io", "clusters", "get"),
        ("postgresql.cnpg.io", "clusters", "patch"),
        ("postgresql.cnpg.io", "clusters/status", "patch"),
    }


def test_rules_match_wildcards_subresources_and_resource_names() -> None:
    docs = [
        {
            "kind": "ClusterRole",
            "metadata": {"name": "reader"},
            "rules": [
                {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"], "resourceNames": ["one"]},
            ],
        },
        {
            "kind": "RoleBinding",
            "metadata": {"name": "reader", "namespace": "a"},
            "roleRef": {"kind": "ClusterRole", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "sa", "namespace": "x"}],
        },
    ]
    rbac = Rbac.from_manifests(docs)
    assert rbac.user == "system:serviceaccount:x:sa"
    assert rbac.authorize(attributes("GET", "/apis/apps/v1/namespaces/a/statefulsets/pg/status"))
    assert not rbac.authorize(attributes("GET", "/apis/apps/v1/namespaces/a/statefulsets/pg"))
    assert rbac.authorize(attributes("DELETE", "/api/v1/namespaces/a/configmaps/one"))
    assert not rbac.authorize(attributes("DELETE", "/api/v1/namespaces/a/configmaps/two"))
    # Bound in namespace a only: the ClusterRole grants nothing in b.
    assert not rbac.authorize(attributes("GET", "/api/v1/namespaces/b/pods/pg-1/status"))


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[tuple[KubeSim, client.CoreV1Api, client.AppsV1Api]]:
    """A cluster under the shipped Role (not the suite's fixture: these requests are meant to be refused), and the
    unmodified client the workers use."""
    async with KubeSim.running(rbac=Rbac.load()) as sim:
        cfg = client.Configuration()
        await config.load_kube_config(
            config_file=str(sim.write_kubeconfig(tmp_path / "kubeconfig")), client_configuration=cfg
        )
        async with client.ApiClient(cfg) as api:
            yield sim, client.CoreV1Api(api), client.AppsV1Api(api)


def _status(exc: ApiException) -> dict[str, object]:
    assert exc.status == 403, exc
    body: dict[str, object] = json.loads(exc.body or "{}")
    assert body["kind"] == "Status" and body["reason"] == "Forbidden" and body["code"] == 403
    return body


async def test_a_verb_the_role_lacks_is_refused_with_the_api_servers_status(
    core: tuple[KubeSim, client.CoreV1Api, client.AppsV1Api],
) -> None:
    sim, core_v1, apps_v1 = core
    assert (await core_v1.read_namespaced_pod("pg-1", "db")).metadata.name == "pg-1"  # granted: get pods

    with pytest.raises(ApiException) as refused:
        await apps_v1.delete_namespaced_stateful_set("pg", "db")
    assert _status(refused.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'statefulsets.apps "pg" is forbidden: User "{USER}" cannot delete resource "statefulsets" '
        'in API group "apps" in the namespace "db"',
        "reason": "Forbidden",
        "details": {"name": "pg", "group": "apps", "kind": "statefulsets"},
        "code": 403,
    }
    assert sim.statefulset("pg") is not None  # refused before anything changed

    with pytest.raises(ApiException) as refused:
        await core_v1.read_namespaced_pod_log("pg-1", "db")
    assert _status(refused.value)["message"] == (
        f'pods "pg-1" is forbidden: User "{USER}" cannot get resource "pods/log" in API group "" in the namespace "db"'
    )
    with pytest.raises(ApiException) as refused:
        await core_v1.list_namespaced_persistent_volume_claim("db")
    assert _status(refused.value)["message"] == (
        f'persistentvolumeclaims is forbidden: User "{USER}" cannot list resource "persistentvolumeclaims" '
        'in API group "" in the namespace "db"'
    )
    with pytest.raises(ApiException) as refused:
        await core_v1.list_namespaced_pod("db", watch=True, timeout_seconds=1)
    assert "cannot watch resource" in str(_status(refused.value)["message"])
    with pytest.raises(ApiException) as refused:
        await core_v1.read_namespaced_pod("coredns", "kube-system")  # the Role is bound in db alone
    assert _status(refused.value)["message"] == (
        f'pods "coredns" is forbidden: User "{USER}" cannot get resource "pods" in API group "" '
        'in the namespace "kube-system"'
    )
    with pytest.raises(ApiException) as refused:
        await core_v1.list_namespace()
    assert _status(refused.value)["message"] == (
        f'namespaces is forbidden: User "{USER}" cannot list resource "namespaces" in API group "" at the cluster scope'
    )
    assert len(sim.rbac.denied if sim.rbac else []) == 6


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/apis/postgresql.cnpg.io/v1/namespaces/db/clusters/pg", True),
        ("PATCH", "/apis/postgresql.cnpg.io/v1/namespaces/db/clusters/pg/status", True),
        ("PATCH", "/apis/postgresql.cnpg.io/v1/namespaces/db/clusters/pg", True),  # its restartedAt annotation
        ("DELETE", "/apis/postgresql.cnpg.io/v1/namespaces/db/clusters/pg", False),
        ("GET", "/apis/postgresql.cnpg.io/v1/namespaces/db/clusters", False),
    ],
)
def test_the_shipped_role_reads_and_patches_a_cloudnativepg_cluster_and_deletes_none(
    method: str, path: str, allowed: bool
) -> None:
    assert Rbac.load().authorize(attributes(method, path)) is allowed


def test_the_suites_cluster_fixture_enforces_the_shipped_role(kube_sim: KubeSim) -> None:
    assert kube_sim.rbac is not None
    assert kube_sim.rbac.user == USER and kube_sim.rbac.granted() == Rbac.load().granted()


async def test_a_rebuild_a_switchover_and_a_restart_under_the_shipped_role_use_every_rule_it_grants(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    used: set[tuple[str, str, str]] = set()
    # The job types on a Patroni cluster, then on CloudNativePG (its Cluster resource instead of a StatefulSet), where
    # pg-restart asks the operator through the Cluster's annotations.
    for profile, rebuilt, candidate in (("zalando", "pg-1", "pg-2"), ("cnpg", "pg-2", "pg-3")):
        async with shipped_role_cluster(profile) as sim:
            kube = PgRebuildSettings(
                kubeconfig=sim.write_kubeconfig(tmp_path / f"kubeconfig-{profile}"), pg_rebuild_poll_interval_s=0.05
            )
            cluster = {"namespace": "db", "cluster": "pg", "profile": profile}
            async with running_worker(settings, kube_registry(kube)):
                # One after the other: each acts on the cluster, one at a time.
                jobs = [("pg-rebuild", {"pod": rebuilt}), ("pg-switchover", {"candidate": candidate})]
                if profile == "cnpg":
                    jobs.append(("pg-restart", {"method": "in-place"}))
                for job_type, params in jobs:
                    job_id = await submit(client, job_type, **cluster, **params)
                    job = await wait_for_status(client, job_id, "success", "failed", within=10)
                    assert job["status"] == "success", job
            assert sim.rbac is not None
            used |= sim.rbac.allowed
            granted = sim.rbac.granted()
    # Least privilege: a rule no call of the jobs needs would show here as granted but never used.
    assert used == granted
