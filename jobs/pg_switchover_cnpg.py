"""pg-switchover's steps on CloudNativePG (profile `cnpg`), which has no Patroni: the job names the new primary in
the Cluster's `status.targetPrimary`, as `kubectl cnpg promote` does, and the operator carries the switchover out.

The same steps and the same guarantees as through Patroni (`jobs.pg_switchover`), with the checks that apply:
the topology recorded once at the start (primary, timeline, candidate); refused before anything changes: a Cluster
whose operator and labels disagree on the primary, one already switching over or not healthy, and a candidate that
is the current primary, not an instance, not a Ready replica the operator counts healthy, or on another timeline.
CloudNativePG's Cluster status reports no replication lag, so `max_lag_bytes` cannot be applied: the details say
so. Crash-safe: the promotion is asked with an optimistic lock on the Cluster as read, and a re-run that finds
`targetPrimary` already naming the candidate asks nothing (the plugin's own rule), so one job promotes once.
What CloudNativePG's fields mean, and where that comes from, is in `jobs.pgkube.cnpg`.
"""

from __future__ import annotations

from jobs.pgkube.cnpg import HEALTHY, CnpgCluster, agreed_primary, describe, look, promote
from jobs.pgkube.handover import Handover
from jobs.pgkube.kube import KubeError, PodView
from jobs.pgkube.params import Refused
from jobs.pgkube.waiting import Seen, WontHeal
from service.jobtypes import TransientError

NO_LAG = "CloudNativePG's Cluster status reports no lag: max_lag_bytes not applied"


def _unfit(s: Handover, cluster: CnpgCluster, pod: PodView) -> str | None:
    """Why `pod` may not become the primary; None if it may."""
    if pod.name == cluster.current_primary or s.profile.is_primary(pod):
        return f"{pod.name} is the current primary"
    if pod.deleting or not pod.ready or not s.profile.is_replica(pod):
        return f"{describe(s, cluster, pod)} is not a Ready replica"
    if pod.name not in cluster.healthy:
        return f"{pod.name} is not among the Cluster's healthy instances ({', '.join(cluster.healthy) or 'none'})"
    timeline = cluster.timelines.get(pod.name)
    if timeline is not None and cluster.timeline is not None and timeline != cluster.timeline:
        return f"{pod.name} is on timeline {timeline}, the Cluster on {cluster.timeline}"
    return None


def _pod(pods: list[PodView], name: str) -> PodView | None:
    return next((p for p in pods if p.name == name), None)


def _candidate(s: Handover, cluster: CnpgCluster, pods: list[PodView], name: str) -> PodView:
    pod = _pod(pods, name)
    if pod is None:
        names = ", ".join(p.name for p in pods)
        raise Refused(f"candidate {name} is not an instance of Cluster {cluster.name} ({names})")
    reason = _unfit(s, cluster, pod)
    if reason is not None:
        raise Refused(f"candidate {reason}")
    return pod


def _check(s: Handover, cluster: CnpgCluster, pods: list[PodView]) -> PodView:
    """Every refusal, against the recorded topology; the candidate when none applies."""
    primary = agreed_primary(s, cluster, pods)
    if primary != s.topology["leader"]:
        raise Refused(f"the primary is {primary}, not {s.topology['leader']} as when the job started")
    return _candidate(s, cluster, pods, s.topology["candidate"])


def _switched(s: Handover, cluster: CnpgCluster) -> bool:
    """The operator made the candidate the primary on a later timeline: the switchover is done."""
    candidate = s.topology["candidate"]
    later = (cluster.timeline or 0) > (s.topology["timeline"] or 0)
    return cluster.current_primary == cluster.target_primary == candidate and later


def _elsewhere(s: Handover, cluster: CnpgCluster) -> None:
    """Fails when the Cluster is headed for another primary than the recorded one or the candidate."""
    expected = (s.topology["leader"], s.topology["candidate"])
    others = {cluster.current_primary, cluster.target_primary} - {None, *expected}
    if others:
        raise WontHeal(f"{cluster.describe()} is headed for {', '.join(sorted(map(str, others)))}, not {expected[1]}")


# Steps (called by jobs.pg_switchover's steps on the cnpg profile)


async def read_topology(s: Handover, named: str | None) -> str:
    topology = s.ctx.state.get("topology")
    cluster, pods = await look(s)
    if topology is None:
        primary = agreed_primary(s, cluster, pods)
        candidate = named
        if candidate is None:
            fit = [p for p in pods if _unfit(s, cluster, p) is None]
            if not fit:
                reasons = "; ".join(_unfit(s, cluster, p) or "" for p in pods if p.name != primary) or "no replicas"
                raise Refused(f"no instance may take over from {primary}: {reasons}")
            candidate = fit[0].name
        topology = {
            "leader": primary,
            "timeline": cluster.timeline,
            "candidate": candidate,
            "members": [describe(s, cluster, p) for p in pods],
        }
        await s.ctx.remember(topology=topology)
    chosen = "named" if named else "the first healthy replica: the Cluster status reports no lag"
    return (
        f"primary {topology['leader']} on timeline {topology['timeline']}; members: {', '.join(topology['members'])}; "
        f"candidate {topology['candidate']} ({chosen})"
    )


async def check_candidate(s: Handover) -> str:
    cluster, pods = await look(s)
    if _switched(s, cluster):
        return f"{cluster.describe()}: the switchover happened earlier in this job"
    candidate = _check(s, cluster, pods)
    return f"{cluster.describe()}; candidate {describe(s, cluster, candidate)} may be promoted; {NO_LAG}"


async def switchover(s: Handover) -> str:
    topology = s.topology
    cluster, pods = await look(s)
    if _switched(s, cluster):
        return f"{cluster.describe()}: switched over earlier in this job, nothing asked"
    if cluster.target_primary == topology["candidate"]:
        # Asked before the worker was lost (or by someone else): the plugin does nothing in that case either.
        return f"status.targetPrimary already names {topology['candidate']}: asked earlier, not asked again"
    _elsewhere(s, cluster)
    _check(s, cluster, pods)
    action = f"status.targetPrimary of Cluster {cluster.name} to {topology['candidate']}, as kubectl cnpg promote does"
    if s.params.dry_run:
        return f"dry run: would set {action}"
    try:
        await promote(s.kube, s.params.namespace, cluster, topology["candidate"])
    except KubeError as exc:
        if exc.status == 409:  # the Cluster changed since it was read: the step runs again and reads it afresh
            raise TransientError(f"Cluster {cluster.name} changed while asking for the switchover: {exc}") from exc
        raise
    return f"set {action} (primary was {topology['leader']})"


async def wait_new_leader(s: Handover) -> str:
    topology = s.topology

    async def probe() -> Seen[str]:
        cluster, pods = await look(s)
        _elsewhere(s, cluster)
        labelled = [p.name for p in pods if s.profile.is_primary(p)]
        if _switched(s, cluster) and labelled == [topology["candidate"]]:
            label = next(s.profile.role(p) for p in pods if p.name == labelled[0])
            return Seen(
                "",
                f"{cluster.current_primary} is the primary on timeline {cluster.timeline} (was {topology['leader']} "
                f"on timeline {topology['timeline']}); labelled {label}",
            )
        return Seen(f"{cluster.describe()}; labelled primary: {', '.join(labelled) or 'none'}")

    return await s.wait(probe, f"waiting for {topology['candidate']} to be the primary", s.params.switchover_timeout_s)


async def wait_replicas(s: Handover) -> str:
    topology = s.topology

    async def probe() -> Seen[str]:
        cluster, pods = await look(s)
        if not _switched(s, cluster):
            raise WontHeal(f"{topology['candidate']} is no longer the primary: {cluster.describe()}")
        others = [p for p in pods if p.name != topology["candidate"]]
        behind = [describe(s, cluster, p) for p in others if _unfit(s, cluster, p) is not None]
        if not behind and cluster.phase == HEALTHY:
            streaming = ", ".join(describe(s, cluster, p) for p in others)
            return Seen("", f"{streaming} follow {topology['candidate']}; {cluster.describe()}; {NO_LAG}")
        return Seen(f"remaining: {', '.join(behind) or cluster.describe()}")

    what = f"waiting for the other instances to follow {topology['candidate']}"
    return await s.wait(probe, what, s.params.settle_timeout_s)
