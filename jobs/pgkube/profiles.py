"""The label conventions of the PostgreSQL operators: which labels select a cluster's pods, which carry the role.

From the public code and docs of Zalando postgres-operator/Spilo, CloudNativePG, Patroni, Crunchy PGO and
StackGres. Patroni removes the role label while a member is not `running`: a pod without one is not ready yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from jobs.pgkube.kube import PodView

# The names a job's `profile` param (and APIOPS_PG_REBUILD_PROFILE) accepts, spelled out once.
ProfileName = Literal["zalando", "cnpg", "patroni", "pgo", "stackgres"]


@dataclass(frozen=True)
class Profile:
    """How an operator labels a PostgreSQL cluster's pods: which labels select the cluster, which carry the role."""

    name: ProfileName
    cluster_labels: tuple[tuple[str, str], ...]  # values may contain "{cluster}"
    role_labels: tuple[str, ...]  # the first one present wins
    primary_roles: frozenset[str]
    replica_roles: frozenset[str] = frozenset({"replica"})
    # Whether Patroni runs in the pods (its REST API on port 8008); CloudNativePG has its own instance manager.
    patroni: bool = True
    # The kind of object that owns the pods: a StatefulSet, or CloudNativePG's own Cluster resource.
    owner: Literal["StatefulSet", "Cluster"] = "StatefulSet"

    def selector(self, cluster: str) -> str:
        return ",".join(f"{key}={value.format(cluster=cluster)}" for key, value in self.cluster_labels)

    def belongs(self, pod: PodView, cluster: str) -> bool:
        return all(pod.labels.get(key) == value.format(cluster=cluster) for key, value in self.cluster_labels)

    def role(self, pod: PodView) -> str | None:
        """The member's role; None while it has no role label (Patroni removes it while a member is not running)."""
        for key in self.role_labels:
            if key in pod.labels:
                return pod.labels[key]
        return None

    def is_primary(self, pod: PodView) -> bool:
        return self.role(pod) in self.primary_roles

    def is_replica(self, pod: PodView) -> bool:
        return self.role(pod) in self.replica_roles


PROFILES: dict[ProfileName, Profile] = {
    p.name: p
    for p in (
        Profile(
            "zalando", (("application", "spilo"), ("cluster-name", "{cluster}")), ("spilo-role",), frozenset({"master"})
        ),
        Profile(
            "cnpg",
            (("cnpg.io/cluster", "{cluster}"), ("cnpg.io/podRole", "instance")),
            ("cnpg.io/instanceRole", "role"),
            frozenset({"primary"}),
            patroni=False,
            owner="Cluster",
        ),
        Profile(
            "patroni",
            (("application", "patroni"), ("cluster-name", "{cluster}")),
            ("role",),
            frozenset({"primary", "master"}),
        ),
        Profile(
            "pgo",
            (("postgres-operator.crunchydata.com/cluster", "{cluster}"),),
            ("postgres-operator.crunchydata.com/role",),
            frozenset({"master"}),
        ),
        Profile(
            "stackgres",
            (("app", "StackGresCluster"), ("stackgres.io/cluster-name", "{cluster}")),
            ("role",),
            frozenset({"primary", "master"}),
        ),
    )
}
# Every profile has a name here and an entry above: a name without a profile fails at import.
assert set(PROFILES) == set(get_args(ProfileName)), "PROFILES and ProfileName disagree"
