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
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jobs.pgkube.kube import Kube

GROUP, VERSION, PLURAL = "postgresql.cnpg.io", "v1", "clusters"
HEALTHY = "Cluster in healthy state"
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


def _cluster(raw: dict[str, Any]) -> CnpgCluster:
    status = raw.get("status") or {}
    reported = status.get("instancesReportedState") or {}
    timeline = status.get("timelineID")
    return CnpgCluster(
        name=raw["metadata"]["name"],
        resource_version=str(raw["metadata"].get("resourceVersion", "")),
        instances=int((raw.get("spec") or {}).get("instances") or 0),
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
    )


async def read_cluster(kube: Kube, namespace: str, name: str) -> CnpgCluster | None:
    raw = await kube.custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return _cluster(raw) if raw is not None else None


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
