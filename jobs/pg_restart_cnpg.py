"""pg-restart's steps on CloudNativePG (profile `cnpg`), which has no Patroni: the job asks for a rolling restart as
`kubectl cnpg restart` does, by setting the Cluster's `kubectl.kubernetes.io/restartedAt` annotation, and the
operator restarts the instances one at a time, the replicas first (each pod deleted and recreated on its PVC), the
primary last: after a switchover to a replica or in place, as the Cluster's `spec.primaryUpdateMethod` says.

The checks are pg-switchover's on CloudNativePG (`jobs.pgkube.cnpg`): one primary the Cluster and the labels agree
on, no switchover under way, the Cluster healthy. Besides, the operator must restart the primary by itself
(`primaryUpdateStrategy: unsupervised`; with `supervised` it waits for a person and the job would wait for ever),
and in the way the job was asked to: a restart cannot choose the method, the Cluster's spec does, so `method:
switchover` needs `primaryUpdateMethod: switchover` and `method: in-place` needs `restart`; a mismatch is refused
with what to change. Patroni's `pending_restart` has no equivalent in the Cluster: `only_pending_restart` is refused
at submission (RestartParams).

The job records the topology before anything changes: the primary, its timeline, each instance's pod uid (a pod
recreated by the operator has a new one: that is how an instance counts as restarted) and the order the operator
follows (replicas from the highest serial, the primary last). Crash-safe: the annotation's value is recorded in the
job's state before the patch, and a re-run that finds that value on the Cluster asks nothing again; patching the
same value twice changes nothing either, so a lost worker never causes a second rolling restart. The waits keep the
members done, in progress and remaining in the job's state and step detail, and fail fast when the instance being
restarted crash-loops (the operator would hold the rollout on it for ever).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jobs.pgkube import rolling
from jobs.pgkube.cluster import PatroniCluster
from jobs.pgkube.cnpg import (
    HEALTHY,
    RESTART_ANNOTATION,
    CnpgCluster,
    agreed_primary,
    ask_restart,
    describe,
    look,
    serial,
)
from jobs.pgkube.kube import PodView
from jobs.pgkube.params import Refused
from jobs.pgkube.rolling import RestartParams
from jobs.pgkube.waiting import PodWatch, Seen, WontHeal

ASKED = "restart_asked"  # the job's state: the restartedAt value this job sets on the Cluster
# Our method names, and the Cluster's spec.primaryUpdateMethod values that do the same.
UPDATE_METHODS = {"switchover": "switchover", "in-place": "restart"}
NO_PATRONI = "CloudNativePG's operator restarts the instances; no Patroni is asked"


def _refusal(cluster: CnpgCluster, method: str) -> str | None:
    """Why the operator would not restart the primary the way the job was asked to; None when it would."""
    if cluster.update_strategy != "unsupervised":
        return (
            f"Cluster {cluster.name} has primaryUpdateStrategy {cluster.update_strategy}: its operator would wait for "
            "someone to switch over or restart the primary; set it to unsupervised for a rolling restart"
        )
    wanted = UPDATE_METHODS[method]
    if cluster.update_method != wanted:
        return (
            f"Cluster {cluster.name} has primaryUpdateMethod {cluster.update_method}, which a restart cannot override: "
            f"ask with method {next(k for k, v in UPDATE_METHODS.items() if v == cluster.update_method)}, or set "
            f"primaryUpdateMethod {wanted} on the Cluster"
        )
    return None


def _check(c: PatroniCluster, cluster: CnpgCluster, pods: list[PodView], method: str) -> str:
    """Every refusal, before the restart is asked; the primary when none applies."""
    primary = agreed_primary(c, cluster, pods)
    refusal = _refusal(cluster, method)
    if refusal is not None:
        raise Refused(refusal)
    return primary


def _progress(c: PatroniCluster, cluster: CnpgCluster, pods: list[PodView]) -> tuple[list[str], list[str]]:
    """The instances restarted (recreated since the job started, Ready, counted healthy) and those being restarted
    (deleting, gone until the operator recreates them, recreated and not back yet), in the planned order."""
    uids: dict[str, str] = rolling.topology(c.ctx)["uids"]
    by_name = {p.name: p for p in pods}
    done: list[str] = []
    moving: list[str] = []
    for name in rolling.planned(c.ctx):
        pod = by_name.get(name)
        if pod is not None and pod.uid == uids.get(name) and not pod.deleting:
            continue  # not restarted yet
        if pod is not None and pod.uid != uids.get(name) and pod.ready and name in cluster.healthy:
            done.append(name)
        else:
            moving.append(name)
    return done, moving


async def _wait(c: PatroniCluster, params: RestartParams, members: list[str], what: str, timeout_s: float) -> str:
    """Waits until every one of `members` is restarted (and, with the primary among them, the Cluster healthy),
    keeping the job's state and detail current. Fails fast when the pod being restarted crash-loops or cannot start,
    and when another rolling restart was asked meanwhile."""
    ctx, asked = c.ctx, c.ctx.state.get(ASKED)
    watch = PodWatch(unschedulable_grace_s=params.restart_timeout_s)

    async def probe() -> Seen[str]:
        cluster, pods = await look(c)
        if cluster.restarted_at != asked:
            raise WontHeal(f"the Cluster's {RESTART_ANNOTATION} is now {cluster.restarted_at}, not this job's {asked}")
        done, moving = _progress(c, cluster, pods)
        for pod in pods:
            if pod.name in moving and not pod.deleting:
                watch.check(pod)  # a crash loop: the operator would hold the rollout on it for ever
        current = ", ".join(moving) or None
        if done != rolling.done(ctx) or current != ctx.state.get("in_progress"):
            await ctx.remember(restarted=done, in_progress=current)
            await ctx.remember(remaining=rolling.remaining(ctx, current))
        finished = all(m in done for m in members)
        if finished and (rolling.topology(ctx)["primary"] not in members or cluster.phase == HEALTHY):
            return Seen("", f"restarted {', '.join(members)}; {cluster.describe()}")
        return Seen(f"{cluster.describe_why()}; {rolling.progress(ctx, current)}")

    return await c.wait(probe, what, timeout_s)


# Steps (called by jobs.pg_restart's steps on the cnpg profile)


async def read_topology(c: PatroniCluster, params: RestartParams) -> str:
    """Reads the Cluster and its pods; changes nothing. Refuses what `_check` refuses; records, once, the topology
    with each instance's pod uid, by which the waits tell a restarted instance."""
    if c.ctx.state.get("topology") is None:
        cluster, pods = await look(c)
        primary = _check(c, cluster, pods, params.method)
        replicas = sorted((p.name for p in pods if p.name != primary), key=serial, reverse=True)
        topology: dict[str, Any] = {
            "leader": primary,
            "timeline": cluster.timeline,
            "members": [describe(c, cluster, p) for p in pods],
            "replicas": replicas,
            "primary": primary,
            "skip": [],
            "uids": {p.name: p.uid for p in pods},
        }
        await c.ctx.remember(topology=topology, restarted=[])
        await c.ctx.remember(remaining=rolling.remaining(c.ctx, None))
    topology = rolling.topology(c.ctx)
    return (
        f"primary {topology['leader']} on timeline {topology['timeline']}; members: {', '.join(topology['members'])}; "
        f"restart order (CloudNativePG's): {rolling.order(topology, params.method)}"
    )


async def restart_replicas(c: PatroniCluster, params: RestartParams) -> str:
    """Asks for the rolling restart once, then waits for the replicas, one at a time as the operator goes."""
    ctx, topology = c.ctx, rolling.topology(c.ctx)
    cluster, pods = await look(c)
    action = f"{RESTART_ANNOTATION} on Cluster {cluster.name}, as kubectl cnpg restart does"
    asked = ctx.state.get(ASKED)
    if asked is None or cluster.restarted_at != asked:
        if asked is None:  # once asked, the instances go down one by one: the checks were made before
            _check(c, cluster, pods, params.method)
            if params.dry_run:
                return f"dry run: would set {action}; {NO_PATRONI}"
            asked = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            await ctx.remember(**{ASKED: asked})  # before the patch: a re-run recognises its own value
        await ask_restart(c.kube, params.namespace, cluster.name, asked)
        said = f"set {action} ({asked})"
        await ctx.progress(f"{said}; {rolling.progress(ctx, None)}")
    else:
        said = f"{RESTART_ANNOTATION} already {asked}: asked earlier in this job, not asked again"
    replicas = topology["replicas"]
    for pod in [m for m in replicas if m not in rolling.done(ctx)]:
        await _wait(c, params, [pod], f"waiting for {pod} to restart", params.restart_timeout_s)
    return f"{said}; restarted {', '.join(replicas) or 'no replica'}, one at a time, each back Ready and healthy"


async def switchover(c: PatroniCluster, params: RestartParams) -> str:
    """With method switchover: waits for the operator's own switchover away from the recorded primary."""
    topology = rolling.topology(c.ctx)
    if params.method != "switchover":
        method = "no switchover: the Cluster's primaryUpdateMethod is restart"
        return f"{method}: the operator restarts {topology['primary']} in place"
    if params.dry_run:
        return "dry run: the operator would switch over to a restarted replica before restarting the primary"

    async def probe() -> Seen[str]:
        cluster, _ = await look(c)
        moved = cluster.current_primary != topology["primary"] and not cluster.switching
        if moved and (cluster.timeline or 0) > (topology["timeline"] or 0):
            return Seen(
                "",
                f"the operator switched over to {cluster.current_primary} on timeline {cluster.timeline} (was "
                f"{topology['primary']} on timeline {topology['timeline']}); {cluster.describe()}",
            )
        return Seen(cluster.describe_why())

    what = f"waiting for the operator to switch over from {topology['primary']}"
    return await c.wait(probe, what, params.switchover_timeout_s)


async def restart_primary(c: PatroniCluster, params: RestartParams) -> str:
    """Waits for the former primary (or the primary, in place) and the Cluster healthy again."""
    topology = rolling.topology(c.ctx)
    primary = topology["primary"]
    if params.dry_run:
        how = "as a replica after the switchover" if params.method == "switchover" else "in place"
        return f"dry run: the operator would restart {primary} {how}"
    said = await _wait(c, params, rolling.planned(c.ctx), f"waiting for {primary} to restart", params.restart_timeout_s)
    return f"{said}; every instance restarted once: {', '.join(rolling.done(c.ctx))}"
