"""CloudNativePG's `Cluster` resource (postgresql.cnpg.io/v1), read and asked to switch over through the custom
objects API: what the pg-* job types need on the `cnpg` profile, where there is no Patroni and no StatefulSet.

From CloudNativePG's documentation and code:
- The operator owns each instance's pod and PVCs itself. Instances are named `<cluster>-<serial>`, serials never
  reused (`status.latestGeneratedNode`); the PGDATA PVC has the pod's name, a WAL PVC `<pod>-wal`. Docs, "Failure
  Modes" (storage space usage): a deleted pod is recreated on its PVC; to have an instance re-cloned, delete its
  PVCs before its pod (`kubectl delete pvc/<cluster>-<serial> pod/<cluster>-<serial>`): the operator then creates
  a new instance under the next serial.
- ClusterStatus: `currentPrimary` and `targetPrimary` (different while a switchover is under way), `instances`,
  `readyInstances`, `instanceNames`, `instancesStatus` (pod names by `healthy`, `replicating`, `failed`),
  `instancesReportedState` (`isPrimary`, `timeLineID` per pod), `timelineID`, `phase` ("Cluster in healthy
  state" when all is well) and `phaseReason`.
- `kubectl cnpg promote <cluster> <pod>` (internal/cmd/plugin/promote/promote.go) does nothing when `targetPrimary`
  already names the pod; otherwise it sets `status.targetPrimary`, `targetPrimaryTimestamp`, `phase` "Switchover in
  progress" and `phaseReason` "Switching over to <pod>" through the status subresource, with an optimistic lock.
  The operator then demotes the current primary and promotes the target, and sets `currentPrimary` to it.
- `kubectl cnpg restart <cluster>` (internal/cmd/plugin/restart) asks for a rolling restart by setting the
  annotation `kubectl.kubernetes.io/restartedAt` on the Cluster to the current time (RFC 3339), a merge patch of
  its metadata. Docs, "Rolling Updates": the operator restarts the replicas one pod at a time, from the highest
  serial, then the primary last, as `spec.primaryUpdateStrategy` (`unsupervised`, the default: by itself;
  `supervised`: it waits for the user) and `spec.primaryUpdateMethod` (`restart`, the default: in place;
  `switchover`: to a replica first) say. Pods are deleted and recreated on their PVCs, without a re-clone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jobs.pgkube.cluster import PatroniCluster
from jobs.pgkube.kube import Kube, PodView
from jobs.pgkube.params import Refused

GROUP, VERSION, PLURAL = "postgresql.cnpg.io", "v1", "clusters"
HEALTHY = "Cluster in healthy state"
RESTART_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
SWITCHOVER = "Switchover in progress"


@dataclass(frozen=True)
class CnpgCluster:
    """What the jobs read of a Cluster."""

    name: str
    resource_version: str
    instances: int  # spec.instances: how many there should be
    ready_instances: int
    current_primary: str | None
    target_primary: str | None
    phase: str
    phase_reason: str
    healthy: tuple[str, ...]  # instancesStatus.healthy
    timeline: int | None
    timelines: dict[str, int]  # instancesReportedState: each instance's timeline as last reported
    restarted_at: str | None = None  # metadata.annotations[RESTART_ANNOTATION]: the last rolling restart asked
    update_strategy: str = "unsupervised"  # spec.primaryUpdateStrategy
    update_method: str = "restart"  # spec.primaryUpdateMethod

    @property
    def switching(self) -> bool:
        return self.target_primary != self.current_primary

    def describe(self) -> str:
        """`Cluster pg (Cluster in healthy state, primary pg-1, 3/3 ready)`."""
        primary = self.current_primary or "none"
        if self.switching:
            primary = f"{primary}, switching over to {self.target_primary}"
        ready = f"{self.ready_instances}/{self.instances} ready"
        return f"Cluster {self.name} ({self.phase or 'no phase'}, primary {primary}, {ready})"

    def describe_why(self) -> str:
        """`describe()` with the operator's phase reason, when it gives one: `...: restarting pg-3`."""
        return f"{self.describe()}: {self.phase_reason}" if self.phase_reason else self.describe()


def serial(instance: str) -> int:
    """An instance's serial (`pg-10`: 10), by which CloudNativePG names and orders its instances (pg-10 after pg-9)."""
    suffix = instance.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else 0


def _cluster(raw: dict[str, Any]) -> CnpgCluster:
    status, spec = raw.get("status") or {}, raw.get("spec") or {}
    reported = status.get("instancesReportedState") or {}
    timeline = status.get("timelineID")
    return CnpgCluster(
        name=raw["metadata"]["name"],
        resource_version=str(raw["metadata"].get("resourceVersion", "")),
        instances=int(spec.get("instances") or 0),
        ready_instances=int(status.get("readyInstances") or 0),
        current_primary=status.get("currentPrimary"),
        target_primary=status.get("targetPrimary"),
        phase=str(status.get("phase") or ""),
        phase_reason=str(status.get("phaseReason") or ""),
        healthy=tuple((status.get("instancesStatus") or {}).get("healthy") or ()),
        timeline=timeline if isinstance(timeline, int) else None,
        timelines={
            name: int(state["timeLineID"])
            for name, state in reported.items()
            if isinstance(state, dict) and isinstance(state.get("timeLineID"), int)
        },
        restarted_at=(raw["metadata"].get("annotations") or {}).get(RESTART_ANNOTATION),
        update_strategy=str(spec.get("primaryUpdateStrategy") or "unsupervised"),
        update_method=str(spec.get("primaryUpdateMethod") or "restart"),
    )


async def read_cluster(kube: Kube, namespace: str, name: str) -> CnpgCluster | None:
    raw = await kube.custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return _cluster(raw) if raw is not None else None


async def look(c: PatroniCluster) -> tuple[CnpgCluster, list[PodView]]:
    """The job's Cluster and its instances' pods; refused when the Cluster is not there."""
    cluster = await read_cluster(c.kube, c.params.namespace, c.params.cluster)
    if cluster is None:
        raise Refused(f"CloudNativePG Cluster {c.params.namespace}/{c.params.cluster} not found")
    return cluster, await c.members()


def describe(c: PatroniCluster, cluster: CnpgCluster, pod: PodView) -> str:
    """`pg-2 (replica, Ready, healthy, timeline 1)`."""
    state = "Ready" if pod.ready and not pod.deleting else "not Ready"
    health = "healthy" if pod.name in cluster.healthy else "not healthy"
    timeline = cluster.timelines.get(pod.name)
    return f"{pod.name} ({c.profile.role(pod) or 'no role'}, {state}, {health}, timeline {timeline or '?'})"


def agreed_primary(c: PatroniCluster, cluster: CnpgCluster, pods: list[PodView]) -> str:
    """The primary the operator and the labels agree on, with no switchover under way and the Cluster healthy:
    what a job that changes the Cluster's instances starts from; refused otherwise."""
    labelled = [p.name for p in pods if c.profile.is_primary(p)]
    if labelled != [cluster.current_primary]:
        raise Refused(f"{cluster.describe()} disagrees with the labels: primary {', '.join(labelled) or 'none'}")
    if cluster.switching:
        raise Refused(f"{cluster.describe()}: a switchover is already under way")
    if cluster.phase != HEALTHY:
        raise Refused(f"{cluster.describe()} is not healthy: {cluster.phase_reason or 'no reason given'}")
    return labelled[0]


async def promote(kube: Kube, namespace: str, cluster: CnpgCluster, pod: str) -> None:
    """What `kubectl cnpg promote` does: name `pod` the target primary, on the Cluster as it was read (a Cluster
    changed since is a 409, raised as KubeError: read it again before asking again)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = {
        "metadata": {"resourceVersion": cluster.resource_version},
        "status": {
            "targetPrimary": pod,
            "targetPrimaryTimestamp": now,
            "phase": SWITCHOVER,
            "phaseReason": f"Switching over to {pod}",
        },
    }
    await kube.patch_custom_status(GROUP, VERSION, namespace, PLURAL, cluster.name, patch)


async def ask_restart(kube: Kube, namespace: str, name: str, at: str) -> None:
    """What `kubectl cnpg restart` does: the Cluster's restartedAt annotation set to `at`. Setting the value it
    already has changes nothing, so a repeated request starts no second rolling restart."""
    patch = {"metadata": {"annotations": {RESTART_ANNOTATION: at}}}
    await kube.patch_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
