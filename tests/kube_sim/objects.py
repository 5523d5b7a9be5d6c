"""Label profiles and builders for the JSON of pods, PVCs, StatefulSets and namespaces.

The builders emit every field that kubernetes_asyncio's models insist on (it raises ValueError on a missing
required field, e.g. V1ContainerStatus.image_id), so a deserialization through the real client never fails.

Profiles follow the table in design/pg-rebuild.md. CloudNativePG has no StatefulSet: on its profile the sim's
cluster is a CloudNativePG `Cluster` (tests.kube_sim.cnpg) instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from tests.kube_sim.store import Obj, now_ts

PVC_PROTECTION = "kubernetes.io/pvc-protection"
IMAGE = "ghcr.io/zalando/spilo-16:3.3-p1"
IMAGE_ID = "ghcr.io/zalando/spilo-16@sha256:" + "0" * 64


@dataclass(frozen=True)
class Profile:
    name: str
    cluster_labels: tuple[tuple[str, str], ...]  # values may contain "{cluster}"
    role_labels: tuple[str, ...]  # every key the operator writes the role to
    primary: str
    replica: str = "replica"

    def labels_for(self, cluster: str) -> dict[str, str]:
        return {key: value.format(cluster=cluster) for key, value in self.cluster_labels}

    def selector(self, cluster: str) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels_for(cluster).items())

    @property
    def role_label(self) -> str:
        return self.role_labels[0]

    def role_of(self, pod: Obj) -> str | None:
        labels = pod["metadata"].get("labels") or {}
        for key in self.role_labels:
            if key in labels:
                return str(labels[key])
        return None

    def set_role(self, pod: Obj, role: str | None) -> None:
        labels = pod["metadata"].setdefault("labels", {})
        for key in self.role_labels:
            if role is None:
                labels.pop(key, None)
            else:
                labels[key] = role


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("zalando", (("application", "spilo"), ("cluster-name", "{cluster}")), ("spilo-role",), "master"),
        Profile(
            "cnpg",
            (("cnpg.io/cluster", "{cluster}"), ("cnpg.io/podRole", "instance")),
            ("cnpg.io/instanceRole", "role"),
            "primary",
        ),
        Profile("patroni", (("application", "patroni"), ("cluster-name", "{cluster}")), ("role",), "primary"),
        Profile(
            "pgo",
            (("postgres-operator.crunchydata.com/cluster", "{cluster}"),),
            ("postgres-operator.crunchydata.com/role",),
            "master",
        ),
        Profile(
            "stackgres", (("app", "StackGresCluster"), ("stackgres.io/cluster-name", "{cluster}")), ("role",), "primary"
        ),
    )
}


def revision(sts_name: str, template: Obj, salt: str = "") -> str:
    """A controller-revision name derived from the pod template, like `pg-7d9c6b5f4`."""
    digest = hashlib.sha256((repr(sorted(template.items())) + salt).encode()).hexdigest()
    return f"{sts_name}-{digest[:9]}"


def namespace_obj(name: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def pvc_spec(storage: str) -> Obj:
    return {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": storage}},
        "storageClassName": "standard",
        "volumeMode": "Filesystem",
    }


def statefulset(name: str, ns: str, labels: dict[str, str], replicas: int, storage: str = "10Gi") -> Obj:
    template: Obj = {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "containers": [
                {
                    "name": "postgres",
                    "image": IMAGE,
                    "ports": [{"containerPort": 5432, "name": "postgresql", "protocol": "TCP"}],
                    "volumeMounts": [{"name": "data", "mountPath": "/home/postgres/pgdata"}],
                }
            ],
            "terminationGracePeriodSeconds": 30,
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "serviceName": name,
            "podManagementPolicy": "OrderedReady",
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
            "template": template,
            "volumeClaimTemplates": [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "data", "labels": dict(labels)},
                    "spec": pvc_spec(storage),
                }
            ],
        },
        "status": {"replicas": 0, "observedGeneration": 1, "collisionCount": 0, "availableReplicas": 0},
    }


def pvc_from_template(sts: Obj, template: Obj, pod_name: str) -> Obj:
    """A claim named `<template>-<pod>`, Pending until the binder binds it."""
    meta = sts["metadata"]
    labels = dict(template["metadata"].get("labels") or {}) | dict(sts["spec"]["selector"]["matchLabels"])
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": f"{template['metadata']['name']}-{pod_name}",
            "namespace": meta["namespace"],
            "labels": labels,
            # The API server's admission plugin adds this finalizer to every claim.
            "finalizers": [PVC_PROTECTION],
        },
        "spec": dict(template["spec"]),
        "status": {"phase": "Pending"},
    }


def pod_from_statefulset(sts: Obj, ordinal: int, rev: str) -> Obj:
    meta = sts["metadata"]
    spec = sts["spec"]
    name = f"{meta['name']}-{ordinal}"
    template = spec["template"]
    labels = dict(template["metadata"].get("labels") or {})
    labels |= {
        "controller-revision-hash": rev,
        "statefulset.kubernetes.io/pod-name": name,
        "apps.kubernetes.io/pod-index": str(ordinal),
    }
    volumes = [
        {"name": t["metadata"]["name"], "persistentVolumeClaim": {"claimName": f"{t['metadata']['name']}-{name}"}}
        for t in spec.get("volumeClaimTemplates") or []
    ]
    pod_spec: dict[str, Any] = dict(template["spec"])
    pod_spec |= {
        "volumes": volumes,
        "hostname": name,
        "subdomain": spec.get("serviceName", meta["name"]),
        "restartPolicy": "Always",
        "schedulerName": "default-scheduler",
        "serviceAccountName": "default",
    }
    owner = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels, "ownerReferences": [owner]},
        "spec": pod_spec,
        "status": {"phase": "Pending", "qosClass": "BestEffort"},
    }


def condition(kind: str, status: bool, reason: str | None = None, message: str | None = None) -> Obj:
    cond: Obj = {"type": kind, "status": "True" if status else "False", "lastTransitionTime": now_ts()}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def container_status(
    name: str,
    *,
    state: Obj,
    ready: bool = False,
    restarts: int = 0,
    started: bool = False,
    last_state: Obj | None = None,
) -> Obj:
    return {
        "name": name,
        "image": IMAGE,
        # Empty until the image has been pulled, as the kubelet reports it.
        "imageID": IMAGE_ID if started else "",
        "ready": ready,
        "started": started,
        "restartCount": restarts,
        "state": state,
        "lastState": last_state or {},
    }
