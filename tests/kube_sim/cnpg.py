"""CloudNativePG on the simulated cluster: its `Cluster` custom resource (postgresql.cnpg.io/v1) and an operator of
its own, which owns the instances' pods and PVCs directly (no StatefulSet).

What it reproduces, from CloudNativePG's documentation and code:
- Instances are named `<cluster>-<serial>`, serials counted from 1 by `status.latestGeneratedNode` and never reused;
  each instance's PGDATA PVC has the pod's name (labels `cnpg.io/instanceName`, `cnpg.io/pvcRole: PG_DATA`,
  annotation `cnpg.io/nodeSerial`). Docs, "Failure Modes" (storage space usage): a pod deleted by the user is
  recreated on its PVC, which is reused; "to prevent the operator from reusing a certain PVC you need to remove the
  PVC before deleting the Pod" (`kubectl delete pvc/<cluster>-<serial> pod/<cluster>-<serial>`). The instance is
  then gone, and the operator creates a new one under the next serial (pg-4 after pg-3), which clones the primary.
  The plugin's `restart` of a replica instance deletes its pod only, so it comes back under the same name.
- `status` fields as in the Cluster CRD's ClusterStatus: `instances`, `readyInstances`, `currentPrimary`,
  `targetPrimary`, `instanceNames`, `latestGeneratedNode`, `instancesStatus` (pod names by `healthy`,
  `replicating`, `failed`), `instancesReportedState` (`isPrimary`, `timeLineID` per pod), `timelineID`, `phase`,
  `phaseReason`, `healthyPVC`, `danglingPVC`. The phases are the operator's words ("Cluster in healthy state",
  "Switchover in progress", "Creating a new replica", "Waiting for the instances to become active").
- A switchover is asked by setting `status.targetPrimary` through the status subresource, as the plugin's
  `kubectl cnpg promote` does (internal/cmd/plugin/promote/promote.go: it sets `targetPrimary`,
  `targetPrimaryTimestamp`, `phase` "Switchover in progress" and `phaseReason` "Switching over to <pod>", and does
  nothing when `targetPrimary` already names the pod). The operator then demotes the current primary, promotes the
  target on a new timeline, and sets `currentPrimary` to it; role labels (`cnpg.io/instanceRole`, `role`) follow.
- A rolling restart is asked as `kubectl cnpg restart <cluster>` asks it: the annotation
  `kubectl.kubernetes.io/restartedAt` set on the Cluster; each pod carries the value it was created under, so a pod
  with another value is out of date. Docs, "Rolling Updates": the replicas one pod at a time, starting from the
  highest serial, each back Ready before the next (the pod deleted and recreated on its PVC, same name, no
  re-clone); "the primary is always the last node to be upgraded": with `primaryUpdateStrategy: unsupervised` by
  a switchover to a replica (`primaryUpdateMethod: switchover`), then the former primary restarted as a replica, or
  restarted in place (`primaryUpdateMethod: restart`, the documented default); with `supervised` the operator waits
  for the user ("Waiting for user action"). An instance that does not come back (a crash loop) holds the rollout
  where it is. The phases are the operator's ("Upgrading cluster", "Primary instance is being restarted without a
  switchover", "Switchover in progress"), "Cluster in healthy state" once every instance is back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.kube_sim.controllers import bind, owned_by
from tests.kube_sim.kubelet import is_ready, pod_claims, settle
from tests.kube_sim.objects import PVC_PROTECTION, Profile, pvc_spec
from tests.kube_sim.store import Obj, Store, now_ts
from tests.kube_sim.timing import Speed, Timers

GROUP = "postgresql.cnpg.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURAL = "clusters"
HEALTHY = "Cluster in healthy state"
SWITCHOVER = "Switchover in progress"
CREATING = "Creating a new replica"
WAITING = "Waiting for the instances to become active"
UPGRADING = "Upgrading cluster"
RESTARTING_PRIMARY = "Primary instance is being restarted without a switchover"
WAITING_FOR_USER = "Waiting for user action"
RESTART_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
# CloudNativePG's default `stopDelay`: the pods' termination grace period.
STOP_DELAY_S = 1800


@dataclass(frozen=True)
class Promotion:
    """One switchover as the operator carried it out."""

    namespace: str
    cluster: str
    primary: str
    target: str
    timeline: int


@dataclass(frozen=True)
class InstanceRestart:
    """One instance the operator restarted in a rolling restart (its pod deleted and recreated on its PVC)."""

    namespace: str
    cluster: str
    pod: str
    role: str  # what it was when restarted: replica, or primary (restarted in place)


def restarted_at(obj: Obj) -> str | None:
    return (obj["metadata"].get("annotations") or {}).get(RESTART_ANNOTATION)


def serial_of(name: str) -> int:
    suffix = name.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else 0


def cluster_obj(name: str, namespace: str, instances: int, storage: str = "10Gi") -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": "Cluster",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "instances": instances,
            "imageName": "ghcr.io/cloudnative-pg/postgresql:16.4",
            "primaryUpdateStrategy": "unsupervised",
            "storage": {"size": storage},
        },
        "status": {"latestGeneratedNode": 0, "timelineID": 1},
    }


def _owner(cluster: Obj) -> Obj:
    meta = cluster["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": "Cluster",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def instance_pvc(cluster: Obj, serial: int) -> Obj:
    """The PGDATA claim of instance `serial`, named like its pod; Pending until the binder binds it."""
    meta = cluster["metadata"]
    name = f"{meta['name']}-{serial}"
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {"cnpg.io/cluster": meta["name"], "cnpg.io/instanceName": name, "cnpg.io/pvcRole": "PG_DATA"},
            "annotations": {"cnpg.io/nodeSerial": str(serial)},
            "finalizers": [PVC_PROTECTION],
            "ownerReferences": [_owner(cluster)],
        },
        "spec": pvc_spec(cluster["spec"]["storage"]["size"]),
        "status": {"phase": "Pending"},
    }


def instance_pod(cluster: Obj, serial: int, profile: Profile) -> Obj:
    meta = cluster["metadata"]
    name = f"{meta['name']}-{serial}"
    labels = profile.labels_for(meta["name"]) | {"cnpg.io/instanceName": name}
    restart = restarted_at(cluster)
    annotations = {"cnpg.io/nodeSerial": str(serial)} | ({RESTART_ANNOTATION: restart} if restart else {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [_owner(cluster)],
        },
        "spec": {
            "containers": [
                {
                    "name": "postgres",
                    "image": cluster["spec"]["imageName"],
                    "ports": [{"containerPort": 5432, "name": "postgresql", "protocol": "TCP"}],
                    "volumeMounts": [{"name": "pgdata", "mountPath": "/var/lib/postgresql/data"}],
                }
            ],
            "volumes": [{"name": "pgdata", "persistentVolumeClaim": {"claimName": name}}],
            "hostname": name,
            "subdomain": f"{meta['name']}-any",
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "serviceAccountName": meta["name"],
            "terminationGracePeriodSeconds": STOP_DELAY_S,
        },
        "status": {"phase": "Pending", "qosClass": "BestEffort"},
    }


class Cnpg:
    """CloudNativePG's operator for every `Cluster` in the store; level-triggered like the other controllers."""

    def __init__(self, store: Store, speed: Speed, profile: Profile) -> None:
        self.store = store
        self.speed = speed
        self.profile = profile
        self.timers = Timers()
        self.history: list[Promotion] = []
        self.restarts: list[InstanceRestart] = []
        self._in_place: set[tuple[str, str]] = set()  # primaries restarted in place: recreated as the primary
        self._rolling: set[str] = set()  # the Clusters (uids) a rolling restart runs on

    def seed(self, namespace: str, name: str, instances: int) -> Obj:
        """A settled Cluster: instances `name-1..`, `name-1` primary, PVCs Bound."""
        cluster = self.store.create(PLURAL, cluster_obj(name, namespace, instances))
        for serial in range(1, instances + 1):
            pvc = self.store.create("persistentvolumeclaims", instance_pvc(cluster, serial))
            bind(pvc)
            self.store.update("persistentvolumeclaims", pvc)
            pod = instance_pod(cluster, serial, self.profile)
            settle(pod)
            self.profile.set_role(pod, self.profile.primary if serial == 1 else self.profile.replica)
            self.store.create("pods", pod)
        first = f"{name}-1"
        cluster["status"] |= {"latestGeneratedNode": instances, "currentPrimary": first, "targetPrimary": first}
        self.store.update(PLURAL, cluster)
        self.reconcile(0.0)
        return self.store.get(PLURAL, namespace, name) or cluster

    def pods(self, cluster: Obj) -> list[Obj]:
        found = self.store.objects("pods", cluster["metadata"]["namespace"])
        return sorted((p for p in found if owned_by(p, cluster)), key=lambda p: serial_of(p["metadata"]["name"]))

    def reconcile(self, now: float) -> None:
        waiting: set[str] = set()
        for cluster in self.store.objects(PLURAL):
            waiting |= self._instances(cluster, now)
            self._promote(cluster, now, waiting)
            self._write_status(cluster, self._roll(cluster))
        self.timers.forget(waiting)

    def _instances(self, cluster: Obj, now: float) -> set[str]:
        """Recreates a deleted pod on its live PVC under the same name; replaces an instance whose PVC is gone by
        a new one under the next serial. Returns the timer keys still waiting."""
        ns, uid = cluster["metadata"]["namespace"], cluster["metadata"]["uid"]
        pods = {p["metadata"]["name"]: p for p in self.pods(cluster)}
        claims = [c for c in self.store.objects("persistentvolumeclaims", ns) if owned_by(c, cluster)]
        live_claims = [c["metadata"]["name"] for c in claims if not c["metadata"].get("deletionTimestamp")]
        waiting: set[str] = set()
        for claim in live_claims:
            if claim in pods:
                continue
            key = f"{uid}/reuse/{claim}"
            waiting.add(key)
            if self.timers.elapsed(key, "missing", now) >= self.speed.recreate:
                pod = instance_pod(cluster, serial_of(claim), self.profile)
                if (ns, claim) in self._in_place:  # the operator keeps it the primary, it does not fail over
                    self._in_place.discard((ns, claim))
                    self.profile.set_role(pod, self.profile.primary)
                self.store.create("pods", pod)
        alive = {name for name, p in pods.items() if not p["metadata"].get("deletionTimestamp")} | set(live_claims)
        if len(alive) < int(cluster["spec"]["instances"]):
            key = f"{uid}/new"
            waiting.add(key)
            if self.timers.elapsed(key, "missing", now) >= self.speed.recreate:
                serial = int(cluster["status"].get("latestGeneratedNode", 0)) + 1
                cluster["status"]["latestGeneratedNode"] = serial
                self.store.create("persistentvolumeclaims", instance_pvc(cluster, serial))
                self.store.create("pods", instance_pod(cluster, serial, self.profile))
        return waiting

    def _promote(self, cluster: Obj, now: float, waiting: set[str]) -> None:
        """Carries out a switchover asked through `status.targetPrimary`, after the speed's switchover delay."""
        status = cluster["status"]
        current, target = status.get("currentPrimary"), status.get("targetPrimary")
        if not target or target == current:
            return
        key = f"{cluster['metadata']['uid']}/promote/{target}"
        waiting.add(key)
        if self.timers.elapsed(key, "asked", now) < self.speed.switchover:
            return
        pods = {p["metadata"]["name"]: p for p in self.pods(cluster)}
        candidate = pods.get(target)
        if candidate is None or not is_ready(candidate):
            return  # the operator waits for the target to be there
        if current in pods:
            self._relabel(pods[current], self.profile.replica)
        self._relabel(candidate, self.profile.primary)
        status["timelineID"] = int(status.get("timelineID", 1)) + 1
        status |= {"currentPrimary": target, "currentPrimaryTimestamp": now_ts()}
        meta = cluster["metadata"]
        self.history.append(Promotion(meta["namespace"], meta["name"], str(current), target, status["timelineID"]))

    def _roll(self, cluster: Obj) -> str | None:
        """One move of a rolling restart asked by the Cluster's restartedAt annotation, when the last one is done:
        restart the next out-of-date replica (highest serial first), then switch over or restart the primary.
        Returns the phase and reason while the rollout runs, None when none does."""
        wanted, uid = restarted_at(cluster), cluster["metadata"]["uid"]
        pods = self.pods(cluster)
        stale = [p for p in pods if wanted is not None and restarted_at(p) != wanted]
        status, spec = cluster["status"], cluster["spec"]
        current = status.get("currentPrimary")
        back = [p for p in pods if not p["metadata"].get("deletionTimestamp") and is_ready(p)]
        out = [p["metadata"]["name"] for p in pods if p not in back or self.profile.role_of(p) is None]
        missing = len(pods) < int(spec["instances"])
        if stale:
            self._rolling.add(uid)
        elif uid not in self._rolling:
            return None
        elif not out and not missing:
            self._rolling.discard(uid)
            return None
        if out or missing:  # one instance at a time: the one restarted is back before the next
            return (
                f"{UPGRADING}: waiting for {', '.join(out) + ' to be back' if out else 'an instance to be recreated'}"
            )
        if status.get("targetPrimary") != current:
            return None  # the switchover's own phase says it
        replicas = sorted(
            (p for p in stale if p["metadata"]["name"] != current), key=lambda p: -serial_of(p["metadata"]["name"])
        )
        if replicas:
            self._restart(cluster, replicas[0], "replica")
            return f"{UPGRADING}: restarting {replicas[0]['metadata']['name']}"
        if spec.get("primaryUpdateStrategy", "unsupervised") == "supervised":
            return f"{WAITING_FOR_USER}: the primary {current} is to be switched over or restarted by the user"
        others = [p["metadata"]["name"] for p in back if p["metadata"]["name"] != current]
        if spec.get("primaryUpdateMethod", "restart") == "switchover" and others:
            target = min(others, key=serial_of)
            status |= {"targetPrimary": target, "phase": SWITCHOVER, "phaseReason": f"Switching over to {target}"}
            return None
        self._in_place.add((cluster["metadata"]["namespace"], str(current)))
        self._restart(cluster, stale[0], "primary")
        return f"{RESTARTING_PRIMARY}: restarting {current}"

    def _restart(self, cluster: Obj, pod: Obj, role: str) -> None:
        """Deletes the pod with the Cluster's stopDelay as its grace period; `_instances` recreates it on its PVC."""
        self.store.mark_deleting("pods", pod, STOP_DELAY_S)
        meta = cluster["metadata"]
        self.restarts.append(InstanceRestart(meta["namespace"], meta["name"], pod["metadata"]["name"], role))

    def _relabel(self, pod: Obj, role: str) -> None:
        self.profile.set_role(pod, role)
        self.store.update("pods", pod)

    def _write_status(self, cluster: Obj, rolling: str | None) -> None:
        status: dict[str, Any] = cluster["status"]
        pods = [p for p in self.pods(cluster) if not p["metadata"].get("deletionTimestamp")]
        names = [p["metadata"]["name"] for p in pods]
        ready = [p["metadata"]["name"] for p in pods if is_ready(p) and self.profile.role_of(p) is not None]
        replicating = [n for n in names if n not in ready]
        timeline = int(status.get("timelineID", 1))
        claims = self.store.objects("persistentvolumeclaims", cluster["metadata"]["namespace"])
        mounted = {claim for p in pods for claim in pod_claims(p)}
        mine = [
            c["metadata"]["name"] for c in claims if owned_by(c, cluster) and not c["metadata"].get("deletionTimestamp")
        ]
        status |= {
            "instances": len(pods),
            "readyInstances": len(ready),
            "instanceNames": names,
            "instancesStatus": {k: v for k, v in (("healthy", ready), ("replicating", replicating)) if v},
            "instancesReportedState": {
                n: {"isPrimary": n == status.get("currentPrimary"), "timeLineID": timeline} for n in ready
            },
            "healthyPVC": sorted(c for c in mine if c in mounted),
            "danglingPVC": sorted(c for c in mine if c not in mounted),
        }
        if status.get("targetPrimary") != status.get("currentPrimary"):
            status |= {"phase": SWITCHOVER, "phaseReason": f"Switching over to {status.get('targetPrimary')}"}
        elif rolling is not None:
            phase, _, reason = rolling.partition(": ")
            status |= {"phase": phase, "phaseReason": reason}
        elif len(pods) < int(cluster["spec"]["instances"]) or any(self.profile.role_of(p) is None for p in pods):
            status |= {"phase": CREATING, "phaseReason": "Creating a new replica"}
        elif replicating:
            status |= {"phase": WAITING, "phaseReason": f"Waiting for {', '.join(replicating)}"}
        else:
            status |= {"phase": HEALTHY, "phaseReason": ""}
        if not status["danglingPVC"]:
            del status["danglingPVC"]
        self.store.update(PLURAL, cluster)
