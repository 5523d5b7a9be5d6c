"""The Kubernetes manifests of deploy/ agree with the code: kinds and API versions Kubernetes serves, a kustomization
that names every manifest, settings every one of which the service knows, probes on the routes the API serves, the
workers' stop sized to their grace period, and pods that run as the image's non-root user without privileges.
(No cluster here: what a cluster would check on apply is checked against the files.)"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings
from starlette.routing import Route

from jobs.registry import REGISTRY
from service.api.app import create_app
from service.cli.processes import STOP_EXTRA_S
from service.settings import Settings
from tests.kube_sim.rbac import service_account_user

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "ServiceAccount": "v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "PodDisruptionBudget": "policy/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
}
EXAMPLES = {"secret.example.yaml"}  # filled in and applied by the operator, not by the kustomization
Obj = dict[str, Any]


def _documents(path: Path) -> list[Obj]:
    with path.open(encoding="utf-8") as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def _objects() -> list[Obj]:
    return [
        doc for path in sorted(DEPLOY.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in _documents(path)
    ]


def _one(kind: str, name: str) -> Obj:
    found = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod_specs() -> Iterator[tuple[str, Obj]]:
    for obj in _objects():
        if obj["kind"] in ("Deployment", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def _known_settings() -> set[str]:
    models: list[type[BaseSettings]] = [Settings, *(t.settings for t in REGISTRY if t.settings is not None)]
    return {f"APIOPS_{name.upper()}" for model in models for name in model.model_fields}


def _env(pod: Obj) -> dict[str, str]:
    """The container's environment as the kubelet builds it from its ConfigMap refs and literal values (Secrets'
    values are the operator's; they appear as '<secret>')."""
    (container,) = pod["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= _one("ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            env |= dict.fromkeys(_one("Secret", source["secretRef"]["name"])["stringData"], "<secret>")
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<secret>")
    return env


def test_every_manifest_is_a_kind_kubernetes_serves_and_the_kustomization_applies_them_all() -> None:
    for obj in _objects():
        assert obj["apiVersion"] == API_VERSIONS.get(obj["kind"]), obj["metadata"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] in ("apiops", "db"), obj["metadata"]
    (kustomization,) = _documents(DEPLOY / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    shipped = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"} - EXAMPLES
    assert sorted(kustomization["resources"]) == sorted(shipped)
    version = next(line for line in PYPROJECT.read_text().splitlines() if line.startswith("version = "))
    assert kustomization["images"] == [
        {"name": "apiops", "newName": "registry.example.com/apiops", "newTag": version.split('"')[1]}
    ]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (apt-get install kubectl)")
def test_kustomize_renders_every_manifest_with_the_image_named() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc is not None]
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert names == sorted((o["kind"], o["metadata"]["name"]) for o in _objects() if o["kind"] != "Secret")
    images = {
        c["image"]
        for o in objects
        if "template" in o.get("spec", {})
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    ((image,),) = [_documents(DEPLOY / "kustomization.yaml")[0]["images"]]
    assert images == {f"{image['newName']}:{image['newTag']}"}


def test_every_setting_in_the_manifests_is_one_the_service_reads() -> None:
    known = _known_settings()
    names = set(_one("ConfigMap", "apiops")["data"])
    for obj in _objects():
        if obj["kind"] == "Secret":
            names |= set(obj["stringData"])
    for _, pod in _pod_specs():
        names |= set(_env(pod))
    assert names - known == set()
    assert all(isinstance(v, str) for v in _one("ConfigMap", "apiops")["data"].values())  # quoted, as env values


def test_every_referenced_config_and_secret_key_exists() -> None:
    for where, pod in _pod_specs():
        (container,) = pod["containers"]
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in _one("Secret", ref["name"])["stringData"], where
        assert container["image"] == "apiops", where


def test_the_api_probes_the_routes_it_serves_on_the_port_it_listens_on() -> None:
    deployment = _one("Deployment", "apiops-api")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(pod)
    assert env["APIOPS_HOST"] == "0.0.0.0" and env["APIOPS_ENV"] == "prod"
    assert container["ports"] == [{"name": "http", "containerPort": int(env["APIOPS_PORT"])}]
    assert "command" not in container  # the image's default: apiops serve
    paths = {r.path for r in create_app(Settings(), REGISTRY).routes if isinstance(r, Route)}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert {"/readyz", "/livez"} <= paths
    # A probe's timeout outlasts the readiness check's own wait for each dependency.
    readiness_timeout = float(
        env.get("APIOPS_READINESS_TIMEOUT_S", Settings.model_fields["readiness_timeout_s"].default)
    )
    assert container["readinessProbe"]["timeoutSeconds"] > readiness_timeout
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert _one("Service", "apiops-api")["spec"]["selector"] == labels
    assert _one("PodDisruptionBudget", "apiops-api")["spec"]["selector"]["matchLabels"] == labels
    assert pod["automountServiceAccountToken"] is False


def test_the_worker_runs_arq_and_gets_its_grace_period_plus_the_hand_back_before_sigkill() -> None:
    deployment = _one("Deployment", "apiops-worker")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["arq", "jobs.worker.WorkerSettings"]
    env = _env(pod)
    grace = float(env.get("APIOPS_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    assert pod["terminationGracePeriodSeconds"] == grace + STOP_EXTRA_S
    assert container["ports"] == [{"name": "metrics", "containerPort": int(env["APIOPS_WORKER_METRICS_PORT"])}]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _one("PodDisruptionBudget", "apiops-worker")["spec"]["selector"]["matchLabels"] == labels
    # Its identity is the one the Role is bound to, in the namespace it runs in.
    account = _one("ServiceAccount", pod["serviceAccountName"])
    binding = _one("RoleBinding", "apiops-worker")
    users = {service_account_user(s["namespace"], s["name"]) for s in binding["subjects"]}
    assert users == {service_account_user(deployment["metadata"]["namespace"], account["metadata"]["name"])}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "apiops-worker"}
    assert _one("Role", "apiops-worker")["metadata"]["namespace"] == binding["metadata"]["namespace"]


def test_the_migration_job_upgrades_as_the_migration_role() -> None:
    pod = _one("Job", "apiops-migrate")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["apiops", "db", "upgrade"]
    (url,) = [v for v in container["env"] if v["name"] == "APIOPS_DATABASE_URL"]
    assert url["valueFrom"]["secretKeyRef"]["name"] == "apiops-migration"
    assert not any("secretRef" in source for source in container.get("envFrom", []))  # not the runtime's URL
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("where", [where for where, _ in _pod_specs()])
def test_every_pod_runs_as_the_images_user_without_privileges_or_a_writable_root(where: str) -> None:
    from tests.test_containerfile import image_user

    pod = dict(_pod_specs())[where]
    uid, gid = image_user()
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": gid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for container in pod["containers"]:
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
        }
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        # The one writable place, for whatever a library puts in a temporary file.
        assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
