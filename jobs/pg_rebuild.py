"""`pg-rebuild`: rebuild one PostgreSQL replica on Kubernetes by recreating its storage.

The replica's data PVCs and then its pod are deleted; the StatefulSet recreates both, and the operator (Patroni,
Spilo, ...) re-clones the new, empty member from the primary. On CloudNativePG (profile `cnpg`) its own operator
owns the pods: it replaces an instance whose PVCs are gone by a new one under the next serial (`jobs.pgkube.cnpg`),
which the job then follows. Before anything is deleted the job refuses the primary, a cluster with another member not
Ready, and a StatefulSet in the middle of a rollout (a CloudNativePG Cluster in the middle of a switchover).

Where the profile has Patroni the job also asks it (`jobs.pgkube.cluster`): it refuses a member Patroni is already
re-cloning and another replica not streaming within `max_lag_bytes`, and waits for the new member to stream within
it. Where Patroni does not answer, the health check says so and the whole job goes by the labels.

Every step re-derives what it needs from the cluster, so each one can run again after a crash at any point:
a PVC already Terminating or gone is deleted already; a pod whose storage is still live is already the
replacement. What the steps learned (the old pod's uid, the primary) is written into their details for the record
and kept in the job's state (`ctx.remember`), so that later steps compare against it on whichever worker they run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from jobs.pgkube.cluster import PatroniCluster, not_streaming, one_leader
from jobs.pgkube.cnpg import CnpgCluster, read_cluster, serial
from jobs.pgkube.kube import Kube, PodView, PvcView, StatefulSetView
from jobs.pgkube.params import (
    MAX_WAIT_S,
    PatroniParams,
    PgSettings,
    PodName,
    Refused,
    Seconds,
    kube_for,
    pg_job_type,
    profile_for,
)
from jobs.pgkube.patroni import ClusterView, Member
from jobs.pgkube.profiles import Profile
from jobs.pgkube.waiting import PodWatch, Seen, Since, WontHeal, describe_pod, wait_until
from service.jobtypes import Step, StepContext

DEFAULT_GRACE_S = 30
REPLANS = 3


class PgRebuildSettings(PgSettings):
    """`APIOPS_KUBE_*` (Kubernetes access), the clusters' label convention and poll interval (`PgSettings`), and
    `APIOPS_PG_REBUILD_*`: how long the waits tolerate what may still heal."""

    # How long a replacement pod may stay Unschedulable, and a deleted PVC Terminating after its pod is gone,
    # before the job calls it a condition that will not heal.
    pg_rebuild_unschedulable_grace_s: Annotated[float, Field(ge=0)] = 60.0
    pg_rebuild_pvc_release_grace_s: Annotated[float, Field(ge=0)] = 30.0


class RebuildParams(PatroniParams):
    # Patroni is asked where the profile has it; on CloudNativePG the job goes through its Cluster resource.
    cnpg_refusal: ClassVar[str | None] = None

    pod: Annotated[PodName, Field(description="the replica pod to rebuild")]
    mode: Literal["recreate-storage"] = "recreate-storage"
    delete_timeout_s: Annotated[Seconds, Field(description="for the old pod and PVCs to go")] = 300
    schedule_timeout_s: Annotated[Seconds, Field(description="for the new pod to be scheduled, its PVC Bound")] = 300
    ready_timeout_s: Annotated[Seconds, Field(description="for the new replica to be Ready (basebackup)")] = 600


@dataclass
class Rebuild:
    """One step's view of the job: where it acts, through which client and label convention."""

    params: RebuildParams
    kube: Kube
    profile: Profile
    settings: PgRebuildSettings
    # The job's state (ctx.remember): what earlier steps saw, whichever worker ran them.
    ctx: StepContext

    @classmethod
    def of(cls, ctx: StepContext, params: RebuildParams) -> Rebuild:
        return cls(params, kube_for(ctx, params), profile_for(ctx, params), ctx.settings, ctx)

    @property
    def ns(self) -> str:
        return self.params.namespace

    @property
    def name(self) -> str:
        return self.params.pod

    @property
    def poll_s(self) -> float:
        return self.settings.pg_rebuild_poll_interval_s

    @property
    def cnpg(self) -> bool:
        """CloudNativePG owns the pods through its Cluster resource; a StatefulSet does otherwise."""
        return self.profile.owner == "Cluster"

    async def members(self) -> list[PodView]:
        return await self.kube.pods(self.ns, self.profile.selector(self.params.cluster))

    async def statefulset(self) -> StatefulSetView:
        # A StatefulSet names its pods `<statefulset>-<ordinal>`, so its name survives the pod's deletion.
        base, _, ordinal = self.name.rpartition("-")
        sts = await self.kube.statefulset(self.ns, base) if base and ordinal.isdigit() else None
        if sts is None:
            raise Refused(f"pod {self.name} is not named like a StatefulSet member, or StatefulSet {base} is gone")
        return sts

    async def cnpg_cluster(self) -> CnpgCluster:
        cluster = await read_cluster(self.kube, self.ns, self.params.cluster)
        if cluster is None:
            raise Refused(f"CloudNativePG Cluster {self.ns}/{self.params.cluster} not found")
        return cluster

    async def claims(self) -> list[str]:
        """The old pod's data PVCs: as preflight recorded them (CloudNativePG: the PVCs the pod mounts), else the
        StatefulSet's claim names for it."""
        recorded: list[str] | None = self.ctx.state.get("claims")
        if recorded is not None:
            return recorded
        return [f"{template}-{self.name}" for template in (await self.statefulset()).claim_templates]

    async def pvcs(self, claims: list[str] | None = None) -> dict[str, PvcView | None]:
        names = claims if claims is not None else await self.claims()
        return {claim: await self.kube.pvc(self.ns, claim) for claim in names}

    async def replacement(self) -> PodView | None:
        """The new member: the StatefulSet recreates the pod under its name; CloudNativePG creates an instance under
        a new serial, the first pod not among the members preflight saw (remembered once found)."""
        if not self.cnpg:
            return await self.kube.pod(self.ns, self.name)
        found: str | None = self.ctx.state.get("replacement")
        if found is not None:
            return await self.kube.pod(self.ns, found)
        before = set(self.ctx.state.get("members") or [self.name])
        new = [p for p in await self.members() if p.name not in before and not p.deleting]
        if not new:
            return None
        pod = min(new, key=lambda p: serial(p.name))  # the lowest new serial: the operator's next instance
        await self.ctx.remember(replacement=pod.name)
        return pod

    async def new_claims(self, pod: PodView) -> list[str]:
        return list(pod.claims) if self.cnpg else await self.claims()


def _pvc_text(pvc: PvcView) -> str:
    return (
        f"{pvc.name} (uid {pvc.uid}, {pvc.storage or 'size unknown'}, {'Terminating' if pvc.deleting else pvc.phase})"
    )


# Checks


@dataclass(frozen=True)
class Health:
    primary: str
    others: list[str]
    target_role: str | None
    ha: str  # what Patroni said of the members, or why the job goes by labels


async def _ha(r: Rebuild, members: list[PodView]) -> ClusterView | str:
    """Patroni's view, or why the job goes by labels alone. The health check decides once, for the whole job: where
    Patroni answered it, it must answer the later steps too (its errors are retried like any API error); where it
    did not, every later step goes by labels as well, so that the job judges the cluster one way throughout."""
    cluster = PatroniCluster.of(r.ctx, r.params)
    if "labels_only" not in r.ctx.state:
        view = await cluster.view_or_why(members)
        await r.ctx.remember(labels_only=view if isinstance(view, str) else "")
        return view
    reason: str = r.ctx.state["labels_only"]
    return reason or await cluster.view(members)


def _leader(r: Rebuild, view: ClusterView, primary: str) -> Member:
    """Patroni's one leader, which must be the member labelled primary."""
    leader = one_leader(view, r.params.cluster)
    if leader.name != primary:
        raise Refused(f"Patroni's leader is {leader.name}, the labels' primary {primary}")
    return leader


def _ha_check(r: Rebuild, name: str, view: ClusterView | str, primary: str, others: list[str]) -> str:
    """Refuses a target Patroni is already re-cloning and another replica that is not streaming from the leader
    within the lag limit; says what Patroni showed, or that the job goes by labels."""
    if isinstance(view, str):
        return f"labels only: {view}"
    leader = _leader(r, view, primary)
    target = view.member(name)
    if target is not None and target.state == "creating replica":
        raise Refused(
            f"pod {name} is already re-cloning (Patroni: creating replica); a second re-clone would race the first"
        )
    members = {other: view.member(other) for other in others if other != primary}
    behind = [
        f"{other} is not in Patroni's member list" if m is None else not_streaming(m, leader, r.params.max_lag_bytes)
        for other, m in members.items()
    ]
    reasons = [reason for reason in behind if reason is not None]
    if reasons:
        raise Refused(
            f"other members not streaming: {'; '.join(reasons)}; rebuilding {name} now could leave the cluster "
            "without a replica"
        )
    streaming = ", ".join(m.describe() for m in members.values() if m is not None)
    return f"Patroni: {leader.name} leads on timeline {leader.timeline}; {streaming or 'no other replica'}"


async def _assess(r: Rebuild, target: str | None = None) -> Health:
    """Exactly one primary, Ready; the target (the pod to rebuild, or after the rebuild its replacement) is not it;
    every other member present, Ready and labelled; the owner's view agrees; Patroni's, where it answers, too."""
    name = target or r.name
    members = await r.members()
    by_name = {p.name: p for p in members}
    target_pod = by_name.get(name)
    if target_pod is None:
        raise Refused(
            f"pod {name} is not a member of cluster {r.params.cluster} ({r.profile.selector(r.params.cluster)})"
        )
    role_key = next((k for k in r.profile.role_labels if k in target_pod.labels), r.profile.role_labels[0])
    if r.profile.is_primary(target_pod):
        raise Refused(f"pod {name} is the primary ({role_key}={r.profile.role(target_pod)}); only replicas are rebuilt")
    primaries = [p for p in members if r.profile.is_primary(p)]
    if len(primaries) != 1:
        found = ", ".join(p.name for p in primaries) or "none"
        raise Refused(f"cluster {r.params.cluster} needs exactly one primary, found {len(primaries)}: {found}")
    primary = primaries[0]
    expected = r.ctx.state.get("primary")
    if expected is not None and expected != primary.name:
        raise WontHeal(f"the primary changed from {expected} to {primary.name}")
    others = [p for p in members if p.name != name]
    unready = [p for p in others if p.deleting or not p.ready or r.profile.role(p) is None]
    if unready:
        seen = ", ".join(describe_pod(p, None if r.profile.role(p) else "no role label") for p in unready)
        raise Refused(
            f"other members not ready: {seen}; rebuilding {name} now could leave the cluster without a replica"
        )
    await _owner_check(r, len(members), primary.name)
    names = [p.name for p in others]
    ha = _ha_check(r, name, await _ha(r, members), primary.name, names)
    return Health(primary.name, names, r.profile.role(target_pod), ha)


async def _owner_check(r: Rebuild, count: int, primary: str) -> None:
    """Every member the owner wants exists; CloudNativePG's operator names the labelled primary as its own and is
    not in the middle of a switchover."""
    if not r.cnpg:
        sts = await r.statefulset()
        if count < sts.replicas:
            raise Refused(f"only {count} of {sts.replicas} members of StatefulSet {sts.name} exist")
        return
    cluster = await r.cnpg_cluster()
    if cluster.switching:
        raise Refused(f"{cluster.describe()} is switching over; wait for it to finish")
    if cluster.current_primary != primary:
        raise Refused(f"{cluster.describe()} disagrees with the labels, which say {primary} is the primary")
    if count < cluster.instances:
        raise Refused(f"only {count} of {cluster.instances} instances of {cluster.describe()} exist")


async def _primary_text(r: Rebuild) -> str:
    """Fails the wait if another pod than the one seen by the health check became the primary."""
    primaries = [p.name for p in await r.members() if r.profile.is_primary(p)]
    if r.name in primaries:
        raise WontHeal(f"pod {r.name} became the primary while it was being rebuilt")
    expected = r.ctx.state.get("primary")
    if expected is None and len(primaries) == 1:
        expected = primaries[0]
        await r.ctx.remember(primary=expected)
    if expected is not None and primaries and primaries != [expected]:
        raise WontHeal(f"the primary changed from {expected} to {', '.join(primaries)} while waiting")
    return "" if primaries else "; no primary labelled right now"


# Steps


async def preflight(ctx: StepContext, params: RebuildParams) -> str:
    """Reads the pod, its owner (a StatefulSet, or CloudNativePG's Cluster) and its PVCs; changes nothing. Done when
    the pod is a member of the cluster, owned as its profile says by an owner not mid-rollout (nor mid-switchover),
    with its data PVCs known; refuses otherwise. Records the pod's uid, its PVCs and the members, by which the
    later steps tell the old pod from its replacement."""
    r = Rebuild.of(ctx, params)
    pod = await r.kube.pod(r.ns, r.name)
    if pod is None:
        raise Refused(f"pod {r.ns}/{r.name} not found")
    if not r.profile.belongs(pod, params.cluster):
        selector = r.profile.selector(params.cluster)
        raise Refused(f"pod {r.name} is not a member of cluster {params.cluster}: labels do not match {selector}")
    if pod.owner_kind != r.profile.owner:
        owner = f"{pod.owner_kind} {pod.owner_name}" if pod.owner_kind else "nothing"
        raise Refused(
            f"pod {r.name} is owned by {owner}, not a {r.profile.owner} as on profile {r.profile.name}: "
            "nothing known would recreate it"
        )
    if pod.deleting:
        raise Refused(f"pod {r.name} is already terminating")
    owner, claims = await (_cluster_owner(r, pod) if r.cnpg else _statefulset_owner(r))
    pvcs = await r.pvcs(claims)
    if not pvcs:
        raise Refused(f"{owner} gives {r.name} no data PVCs: it has no storage to recreate")
    missing = [name for name, pvc in pvcs.items() if pvc is None]
    if missing:
        raise Refused(f"data PVCs of {r.name} not found: {', '.join(missing)}")
    await ctx.remember(old_uid=pod.uid, claims=claims, members=[p.name for p in await r.members()])
    storage = ", ".join(_pvc_text(pvc) for pvc in pvcs.values() if pvc is not None)
    return f"pod {r.name} (uid {pod.uid}, node {pod.node or 'none'}) of {owner}; data PVCs: {storage}"


async def _statefulset_owner(r: Rebuild) -> tuple[str, list[str]]:
    """The StatefulSet, not mid-rollout, and the pod's claims from its volumeClaimTemplates."""
    sts = await r.statefulset()
    if sts.rolling_out:
        raise Refused(
            f"StatefulSet {sts.name} is mid-rollout (currentRevision {sts.current_revision} != updateRevision "
            f"{sts.update_revision}); wait for it to finish"
        )
    return f"StatefulSet {sts.name} at revision {sts.current_revision}", await r.claims()


async def _cluster_owner(r: Rebuild, pod: PodView) -> tuple[str, list[str]]:
    """CloudNativePG's Cluster, not mid-switchover, and the PVCs the pod mounts (PGDATA, and WAL if separate): the
    ones its docs say to delete before the pod so that the operator re-clones the instance instead of reusing them."""
    cluster = await r.cnpg_cluster()
    if cluster.switching:
        raise Refused(f"{cluster.describe()} is switching over; wait for it to finish")
    return f"CloudNativePG {cluster.describe()}", list(pod.claims)


async def check_cluster_health(ctx: StepContext, params: RebuildParams) -> str:
    """Reads the members; changes nothing. Done when there is exactly one primary, Ready, which is not the target,
    and every other member is Ready with a role label; refuses otherwise."""
    r = Rebuild.of(ctx, params)
    health = await _assess(r)
    await ctx.remember(primary=health.primary)
    return (
        f"primary {health.primary} healthy; {len(health.others)}/{len(health.others)} other members ready "
        f"({', '.join(health.others)}); {r.name} is {health.target_role or 'unlabelled (not running)'}; {health.ha}"
    )


async def delete_pvcs(ctx: StepContext, params: RebuildParams) -> str:
    """Deletes the pod's data PVCs with a uid precondition, after checking the cluster once more. Each stays
    Terminating (pvc-protection) until the pod is gone. Done when every data PVC is Terminating or gone; a PVC
    already so counts as done, so a re-run deletes nothing twice."""
    r = Rebuild.of(ctx, params)
    pod = await r.kube.pod(r.ns, r.name)
    if pod is None:
        raise Refused(f"pod {r.name} disappeared before its storage was deleted")
    await _assess(r)
    done = []
    for claim in await r.claims():
        done.append(await _delete_claim(r, claim))
    if params.dry_run:
        return "dry run: would delete " + "; ".join(done)
    return "; ".join(done) + f" (each stays Terminating until pod {r.name} is gone)"


async def _delete_claim(r: Rebuild, claim: str) -> str:
    for _ in range(REPLANS):
        pvc = await r.kube.pvc(r.ns, claim)
        if pvc is None:
            return f"PVC {claim} already gone"
        if pvc.deleting:
            return f"PVC {claim} (uid {pvc.uid}) already Terminating"
        outcome = await r.kube.delete_pvc(r.ns, claim, pvc.uid, dry_run=r.params.dry_run)
        if outcome == "deleted":
            return f"PVC {_pvc_text(pvc)}" if r.params.dry_run else f"deleted PVC {claim} (uid {pvc.uid})"
        if outcome == "gone":
            return f"PVC {claim} already gone"
    raise Refused(f"PVC {claim} kept changing under the uid precondition")


async def delete_pod(ctx: StepContext, params: RebuildParams) -> str:
    """Deletes the pod with a uid precondition and its own grace period. Done when the old pod is Terminating or
    gone. A pod whose data PVCs are all live (not Terminating) is already the replacement and is left alone, so a
    re-run never deletes the new pod; a 409 on the precondition means the pod changed: it is read again."""
    r = Rebuild.of(ctx, params)
    for _ in range(REPLANS):
        pod = await r.kube.pod(r.ns, r.name)
        if pod is None:
            return f"pod {r.name} already gone"
        if pod.deleting:
            return f"pod {r.name} (uid {pod.uid}) already terminating"
        pvcs = await r.pvcs()
        if not params.dry_run and all(pvc is not None and not pvc.deleting for pvc in pvcs.values()):
            return f"pod {r.name} already replaced (uid {pod.uid}, with live PVCs)"
        await _assess(r)
        grace = pod.grace_s if pod.grace_s is not None else DEFAULT_GRACE_S
        outcome = await r.kube.delete_pod(r.ns, r.name, pod.uid, grace, dry_run=params.dry_run)
        if outcome == "gone":
            return f"pod {r.name} already gone"
        if outcome == "deleted":
            verb = "dry run: would delete" if params.dry_run else "deleted"
            return f"{verb} pod {r.name} (uid {pod.uid}, node {pod.node or 'none'}) with grace period {grace}s"
    raise Refused(f"pod {r.name} kept changing under the uid precondition")


DRY_RUN_WAIT = "dry run: nothing deleted, nothing to wait for"


async def wait_old_gone(ctx: StepContext, params: RebuildParams) -> str:
    """Changes nothing; polls. Done when the old pod (Terminating, or still mounting a Terminating PVC) and the old
    PVCs are gone. Fails fast when a PVC stays Terminating well after its pod is gone, naming its finalizers."""
    if params.dry_run:
        return DRY_RUN_WAIT
    r = Rebuild.of(ctx, params)
    grace = r.settings.pg_rebuild_pvc_release_grace_s
    since = Since()

    async def probe() -> Seen[str]:
        primary = await _primary_text(r)
        pod = await r.kube.pod(r.ns, r.name)
        pvcs = await r.pvcs()
        old_storage = [pvc for pvc in pvcs.values() if pvc is not None and pvc.deleting]
        # A StatefulSet's replacement takes the old name, with new PVCs; CloudNativePG's never does.
        stale = r.cnpg or any(pvc is None or pvc.deleting for pvc in pvcs.values())
        old_pod = pod is not None and (pod.deleting or stale)
        if not old_pod and not old_storage:
            new = f"; replacement pod {pod.name} (uid {pod.uid}) created" if pod is not None else ""
            return Seen("", f"old pod {r.name} and PVCs {', '.join(pvcs)} gone{new}")
        remaining = [describe_pod(pod)] if pod is not None and old_pod else []
        remaining += [
            f"PVC {pvc.name} (Terminating; finalizers: {', '.join(pvc.finalizers) or 'none'})" for pvc in old_storage
        ]
        held = since.held("pvc", not old_pod)
        if held >= grace:
            stuck = old_storage[0]
            raise WontHeal(
                f"PVC {stuck.name} still Terminating {held:.0f}s after pod {r.name} is gone; "
                f"finalizers: {', '.join(stuck.finalizers) or 'none'}"
            )
        return Seen(f"remaining: {', '.join(remaining)}{primary}")

    return await wait_until(
        ctx,
        probe,
        what="waiting for the old pod and PVCs to go",
        timeout_s=params.delete_timeout_s,
        interval_s=r.poll_s,
    )


async def wait_scheduled(ctx: StepContext, params: RebuildParams) -> str:
    """Changes nothing; polls. Done when a new pod exists, is scheduled to a node and its data PVCs are Bound.
    Fails fast when it stays Unschedulable longer than the grace period (quoting the scheduler) or its claim is
    missing, or when its container is in a state that will not heal."""
    if params.dry_run:
        return DRY_RUN_WAIT
    r = Rebuild.of(ctx, params)
    watch = PodWatch(r.settings.pg_rebuild_unschedulable_grace_s)

    async def probe() -> Seen[str]:
        primary = await _primary_text(r)
        pod = await r.replacement()
        if pod is None or pod.deleting:
            return Seen(f"remaining: {'a new instance' if r.cnpg else r.name} (not created yet){primary}")
        watch.check(pod)
        pvcs = await r.pvcs(await r.new_claims(pod))
        unbound = [
            f"PVC {name} ({'missing' if pvc is None else pvc.phase})"
            for name, pvc in pvcs.items()
            if pvc is None or pvc.phase != "Bound"
        ]
        if pod.node is not None and not unbound:
            bound = ", ".join(_pvc_text(pvc) for pvc in pvcs.values() if pvc is not None)
            return Seen("", f"pod {pod.name} (uid {pod.uid}) scheduled on {pod.node}; PVCs {bound}")
        return Seen(f"remaining: {', '.join([describe_pod(pod), *unbound])}{primary}")

    return await wait_until(
        ctx,
        probe,
        what="waiting for the new pod to be scheduled",
        timeout_s=params.schedule_timeout_s,
        interval_s=r.poll_s,
    )


async def wait_ready(ctx: StepContext, params: RebuildParams) -> str:
    """Changes nothing; polls. Done when the new pod is Ready, carries the replica role label (the operator labels a
    member only once it runs) and, where Patroni answered the health check, Patroni shows it `streaming` from the
    leader on its timeline within `max_lag_bytes`. Fails fast on a container state that will not heal
    (CrashLoopBackOff, image pull errors, config errors), on climbing restarts and on the primary changing."""
    if params.dry_run:
        return DRY_RUN_WAIT
    r = Rebuild.of(ctx, params)
    watch = PodWatch(r.settings.pg_rebuild_unschedulable_grace_s)
    started = asyncio.get_running_loop().time()

    async def probe() -> Seen[str]:
        primary = await _primary_text(r)
        pod = await r.replacement()
        if pod is None:
            return Seen(f"remaining: {r.ctx.state.get('replacement') or r.name} (missing){primary}")
        watch.check(pod)
        if pod.ready and r.profile.is_replica(pod):
            behind, streaming = await _replicating(r, pod)
            if behind is None:
                took = asyncio.get_running_loop().time() - started
                role = r.profile.role(pod)
                return Seen("", f"pod {pod.name} (uid {pod.uid}) Ready as {role}, {streaming}, after {took:.0f}s")
            return Seen(f"remaining: {behind}{primary}")
        role = f"no {r.profile.role_labels[0]} label yet" if pod.ready else None
        return Seen(f"remaining: {describe_pod(pod, role)}{primary}")

    return await wait_until(ctx, probe, what="waiting for pods", timeout_s=params.ready_timeout_s, interval_s=r.poll_s)


async def _replicating(r: Rebuild, pod: PodView) -> tuple[str | None, str]:
    """What still keeps the new member from counting as a replica by Patroni's word (None: nothing), and what
    Patroni shows of it, or why the job goes by labels."""
    view = await _ha(r, await r.members())
    if isinstance(view, str):
        return None, f"labels only: {view}"
    leaders = view.leaders
    member = view.member(pod.name)
    if len(leaders) != 1 or member is None:
        seen = f"leaders {', '.join(m.name for m in leaders) or 'none'}" if member else "not in its member list yet"
        return f"{pod.name} (Patroni: {seen})", ""
    behind = not_streaming(member, leaders[0], r.params.max_lag_bytes)
    if behind is not None:
        return f"{member.describe()}: {behind}", ""
    return None, f"streaming from {leaders[0].name} (timeline {member.timeline}, lag {member.lag} B)"


async def post_check(ctx: StepContext, params: RebuildParams) -> str:
    """Reads the members; changes nothing. Done when the primary is the one the health check saw and every member,
    the rebuilt one (under its new name on CloudNativePG) among them, is Ready with a role label."""
    r = Rebuild.of(ctx, params)
    expected = r.ctx.state.get("primary")
    pod = await r.kube.pod(r.ns, r.name) if params.dry_run else await r.replacement()
    if pod is None or not pod.ready:
        raise WontHeal(f"pod {pod.name if pod else r.name} is not Ready: {describe_pod(pod) if pod else 'missing'}")
    health = await _assess(r, pod.name)
    same = "unchanged" if expected == health.primary else "(no primary was recorded to compare with)"
    old = r.ctx.state.get("old_uid")
    rebuilt = f"uid {old} -> {pod.uid}" if old and not params.dry_run else f"uid {pod.uid}"
    verb = "untouched (dry run)" if params.dry_run else "rebuilt" if pod.name == r.name else f"rebuilt as {pod.name}"
    return (
        f"primary {health.primary} {same}; {len(health.others) + 1}/{len(health.others) + 1} members ready; "
        f"{r.name} {verb} ({rebuilt})"
    )


STEPS: list[Step[RebuildParams]] = [
    Step("preflight", preflight, timeout_s=60, max_attempts=5),
    Step("check-cluster-health", check_cluster_health, timeout_s=60, max_attempts=5),
    Step("delete-pvcs", delete_pvcs, timeout_s=120, max_attempts=5),
    Step("delete-pod", delete_pod, timeout_s=120, max_attempts=5),
    # The params' timeouts bound these waits; the step deadline is only a backstop above the largest allowed.
    Step("wait-old-gone", wait_old_gone, timeout_s=MAX_WAIT_S + 120, max_attempts=3),
    Step("wait-scheduled", wait_scheduled, timeout_s=MAX_WAIT_S + 120, max_attempts=3),
    Step("wait-ready", wait_ready, timeout_s=MAX_WAIT_S + 120, max_attempts=3),
    Step("post-check", post_check, timeout_s=60, max_attempts=5),
]


JOB = pg_job_type(
    "pg-rebuild",
    (
        "Rebuild one PostgreSQL replica on Kubernetes: delete its data PVCs and pod, wait until the StatefulSet "
        "recreates them (CloudNativePG: a new instance replaces it) and the new member is Ready as a replica, "
        "streaming within max_lag_bytes where Patroni tells. Refuses the primary, an unhealthy cluster, a member "
        "already re-cloning and a StatefulSet mid-rollout before deleting anything; `dry_run` only reports what it "
        "would delete."
    ),
    RebuildParams,
    STEPS,
    PgRebuildSettings,
)
