"""`pg-restart`: a rolling restart of a Patroni cluster through Patroni's POST /restart, the primary last.

The replicas one at a time, each back `streaming` within the lag limit before the next; then, by default, a
switchover to the healthiest replica (pg-switchover's own code, `jobs.pgkube.handover`) and a restart of the former
primary, now a replica, so that the clients see one switchover instead of a primary down while it restarts. With
`method: in-place` the primary is restarted where it is (Patroni keeps its leader lock meanwhile). With
`only_pending_restart`, members Patroni does not flag `pending_restart` (a changed parameter that needs a restart to
apply) are skipped, and Patroni itself checks the flag again when asked (`restart_pending`).

Before anything changes the job records the topology it found (leader, timeline, the members and the order it will
restart them in) and refuses a cluster without exactly one leader, a paused one, and one with a member that is not
healthy: a rolling restart takes one member out at a time and must not start with another one already out. The
topology is recorded once; every later step compares against it, on whichever worker it runs.

Crash-safe: each member's restart is recorded before it is sent and recognised afterwards by its PostgreSQL's start
time (`jobs.pgkube.memberops`): a resumed job continues with the member it was on and never restarts a member twice;
the members done are kept in the job's state. A restart that crash-loops fails the job fast, before any other member
is touched.

CloudNativePG has no Patroni: on the `cnpg` profile each step hands over to `jobs.pg_restart_cnpg`, which asks the
operator for its own rolling restart through the Cluster resource (as `kubectl cnpg restart` does) and follows it.
"""

from __future__ import annotations

from typing import Any

from jobs import pg_restart_cnpg as cnpg
from jobs.pgkube import params as pg
from jobs.pgkube import rolling
from jobs.pgkube.cluster import PatroniCluster, best, not_paused, not_streaming, one_leader
from jobs.pgkube.handover import Handover
from jobs.pgkube.memberops import RESTART, Churn, ask_once, wait_back
from jobs.pgkube.params import PgSettings, Refused, pg_job_type
from jobs.pgkube.patroni import ClusterView, PatroniUnavailable
from jobs.pgkube.rolling import RestartParams
from service.jobtypes import Step, StepContext

MARK = "restarting"  # the job's state: the member being restarted, its start time before, whether it was asked
NOT_PENDING = "restart conditions are not satisfied"  # Patroni, asked with restart_pending on a member without it


def _unhealthy(view: ClusterView, cluster: str, max_lag: int) -> str | None:
    """Why the cluster may not lose a member to a restart now; None when every member is healthy."""
    leader = one_leader(view, cluster)
    if leader.state != "running":
        return f"the leader {leader.name} is {leader.state}, not running"
    reasons = [not_streaming(m, leader, max_lag) for m in view.members if not m.leads]
    found = [r for r in reasons if r is not None]
    return "; ".join(found) if found else None


def _plan(params: RestartParams, view: ClusterView, leader: str) -> dict[str, Any]:
    """Which members to restart, in which order (the replicas by name, the primary last), which to skip."""
    wanted = [m for m in view.members if m.pending_restart or not params.only_pending_restart]
    skipped = [m.name for m in view.members if m not in wanted]
    replicas = [m.name for m in wanted if m.name != leader]
    return {"replicas": replicas, "primary": leader if any(m.name == leader for m in wanted) else None, "skip": skipped}


async def _finished(ctx: StepContext, pod: str) -> None:
    """Records `pod` done: the job's state says, besides the topology, what is done (`restarted`), what is in
    progress (`restarting`, with the request's mark) and what remains (`remaining`)."""
    await ctx.remember(restarted=[*rolling.done(ctx), pod], **{MARK: None})
    await ctx.remember(remaining=rolling.remaining(ctx, None))


async def _restart(c: PatroniCluster, params: RestartParams, pod: str) -> str:
    """Restarts `pod` once (see `jobs.pgkube.memberops`) and waits until it is back and healthy; records it done."""
    ctx = c.ctx
    churn = Churn(RESTART)

    async def send() -> str:
        try:
            pending_only, timeout_s = params.only_pending_restart, params.restart_timeout_s
            return await c.patroni.restart(pod, pending_only=pending_only, timeout_s=timeout_s)
        except PatroniUnavailable as exc:
            if exc.answer == "restart failed":  # PostgreSQL did not come back: the wait tells a crash loop
                churn.see(pod, exc.answer)
                return exc.answer
            raise

    await ctx.remember(remaining=rolling.remaining(ctx, pod))
    await ctx.progress(f"restarting {pod}; {rolling.progress(ctx, pod)}")
    try:
        mark, said = await ask_once(c, RESTART, pod, send, key=MARK, timeout_s=params.restart_timeout_s)
    except PatroniUnavailable as exc:
        if exc.answer != NOT_PENDING:
            raise
        # Patroni no longer flags it (restarted by someone else meanwhile): nothing left to apply.
        await _finished(ctx, pod)
        return f"{pod} no longer pending a restart, skipped"
    what = f"waiting for {pod} after its restart ({said}); {rolling.progress(ctx, pod)}"
    back = await wait_back(c, RESTART, pod, mark, timeout_s=params.restart_timeout_s, what=what, churn=churn)
    await _finished(ctx, pod)
    return back


# Steps


async def read_topology(ctx: StepContext, params: RestartParams) -> str:
    """Reads the members and Patroni's view; changes nothing. Records, once, the leader, its timeline, the members and
    the plan: the replicas to restart in order, the primary last (or not, with only_pending_restart and no flag), and
    the members skipped. Refuses a cluster without exactly one leader, a paused one, one with a member unhealthy, and,
    when the primary is to be switched away from, one where no replica may take over."""
    c = PatroniCluster.of(ctx, params)
    if not c.profile.patroni:  # CloudNativePG: its operator restarts the instances
        return await cnpg.read_topology(c, params)
    view = await c.view()
    if ctx.state.get("topology") is None:
        leader = one_leader(view, params.cluster)
        not_paused(view, params.cluster)
        unhealthy = _unhealthy(view, params.cluster, params.max_lag_bytes)
        if unhealthy is not None:
            raise Refused(f"every member must be healthy before a rolling restart: {unhealthy}")
        plan = _plan(params, view, leader.name)
        if plan["primary"] and params.method == "switchover":
            best(view, leader, params.max_lag_bytes)  # refuses now, not after the replicas, if none may take over
        topology = {
            "leader": leader.name,
            "timeline": leader.timeline,
            "members": [m.describe() for m in view.members],
            **plan,
        }
        await ctx.remember(topology=topology, restarted=[])
        await ctx.remember(remaining=rolling.remaining(ctx, None))
    topology = rolling.topology(ctx)
    skipped = f"; skipped (no pending restart): {', '.join(topology['skip'])}" if topology["skip"] else ""
    return (
        f"leader {topology['leader']} on timeline {topology['timeline']}; members: {', '.join(topology['members'])}; "
        f"restart order: {rolling.order(topology, params.method)}{skipped}"
    )


async def restart_replicas(ctx: StepContext, params: RestartParams) -> str:
    """Restarts the planned replicas one at a time through Patroni, each back `streaming` on the leader's timeline
    within the lag limit before the next. Done when every one is recorded done; a resumed run continues with the
    member it was on and never restarts one twice. Fails fast on a restart that crash-loops."""
    c = PatroniCluster.of(ctx, params)
    if not c.profile.patroni:  # CloudNativePG: its operator restarts the instances
        return await cnpg.restart_replicas(c, params)
    topology = rolling.topology(ctx)
    replicas = topology["replicas"]
    if params.dry_run:
        return f"dry run: would restart {', '.join(replicas) or 'no replica'}, one at a time"
    for pod in replicas:
        if pod in rolling.done(ctx):
            continue
        if ctx.state.get(MARK) is None:  # not resumed in the middle of this member: the others must be healthy
            unhealthy = _unhealthy(await c.view(), params.cluster, params.max_lag_bytes)
            if unhealthy is not None:
                raise Refused(f"before restarting {pod}: {unhealthy}")
        await _restart(c, params, pod)
    done = ", ".join(m for m in rolling.done(ctx) if m in replicas) or "no replica"
    return f"restarted {done}, one at a time, each back streaming within {params.max_lag_bytes} bytes"


async def switchover(ctx: StepContext, params: RestartParams) -> str:
    """With method switchover and the primary to restart: records, once, the leader and the healthiest replica to
    take over, then switches over exactly as pg-switchover does (checked again, asked once, a switchover already done
    recognised) and waits until the candidate leads and every other member streams from it. Otherwise does nothing."""
    c = PatroniCluster.of(ctx, params)
    if not c.profile.patroni:  # CloudNativePG: its operator restarts the instances
        return await cnpg.switchover(c, params)
    topology = rolling.topology(ctx)
    if topology["primary"] is None or params.method != "switchover":
        why = "the primary is not to be restarted" if topology["primary"] is None else "method in-place"
        return f"no switchover: {why}"
    h = Handover.under(ctx, params, key="handover", sent="handover_sent")
    if not h.recorded:
        view = await h.view()
        leader = one_leader(view, params.cluster)
        if leader.name != topology["leader"]:
            raise Refused(f"the leader is {leader.name}, not {topology['leader']} as when the job started")
        candidate = best(view, leader, params.max_lag_bytes)
        await ctx.remember(handover={"leader": leader.name, "timeline": leader.timeline, "candidate": candidate.name})
    await ctx.progress(f"switching over from {h.topology['leader']} to {h.topology['candidate']}, then restarting it")
    said = await h.switch_over()
    if params.dry_run:
        return said
    led = await h.wait_new_leader()
    streaming = await h.wait_replicas()
    return f"{said}; {led}; {streaming}"


async def restart_primary(ctx: StepContext, params: RestartParams) -> str:
    """Restarts the former primary (a replica since the switchover), or the primary in place with method in-place,
    once; done when it is back: streaming within the lag limit, or running as the leader. Fails fast on a crash loop."""
    c = PatroniCluster.of(ctx, params)
    if not c.profile.patroni:  # CloudNativePG: its operator restarts the instances
        return await cnpg.restart_primary(c, params)
    topology = rolling.topology(ctx)
    primary = topology["primary"]
    if primary is None:
        return f"{topology['leader']} not restarted: Patroni flags no pending restart on it"
    if params.dry_run:
        how = "after the switchover" if params.method == "switchover" else "in place"
        return f"dry run: would restart {primary} {how}"
    if primary not in rolling.done(ctx):
        back = await _restart(c, params, primary)
    else:
        back = f"{primary} restarted earlier in this job"
    return f"{back}; every member restarted once: {', '.join(rolling.done(ctx))}"


STEPS: list[Step[RestartParams]] = [
    Step("read-topology", read_topology, timeout_s=60, max_attempts=5),
    # Bounded by the params' timeouts per member; the deadlines are backstops.
    Step("restart-replicas", restart_replicas, timeout_s=4 * pg.MAX_WAIT_S, max_attempts=3),
    Step("switchover", switchover, timeout_s=3 * pg.MAX_WAIT_S + 120, max_attempts=5),
    Step("restart-primary", restart_primary, timeout_s=2 * pg.MAX_WAIT_S + 120, max_attempts=3),
]

JOB = pg_job_type(
    "pg-restart",
    (
        "Restart every member of a Patroni cluster through Patroni's REST API, one at a time: the replicas, each "
        "back streaming within the lag limit before the next, then a switchover to a healthy replica and the former "
        "primary (`method: in-place`: the primary where it is). `only_pending_restart` skips the members Patroni "
        "does not flag pending_restart. Refuses an unhealthy or paused cluster; `dry_run` only runs the checks. On "
        "CloudNativePG (profile cnpg), asks its operator for a rolling restart, as `kubectl cnpg restart` does, and "
        "follows it instance by instance."
    ),
    RestartParams,
    STEPS,
    PgSettings,
)
