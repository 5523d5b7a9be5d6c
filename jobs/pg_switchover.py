"""`pg-switchover`: move a cluster's primary to a named replica, or to the best one, through Patroni (or CloudNativePG).

Patroni is asked through the Kubernetes API's pod proxy (`jobs.pgkube.patroni`). Before anything changes, the job
records the topology it found (leader, timeline, candidate) and refuses a cluster that is not exactly one leader,
the recorded one; a paused cluster; and a candidate that is not a member, not `streaming`, not on the leader's
timeline, lagging more than `max_lag_bytes`, tagged `nofailover`, or not the synchronous standby of a cluster in
synchronous mode. Then one switchover, then the waits: the candidate leads on a higher timeline with the role labels
following, and every other member streams from it within the lag limit.

Crash-safe: the topology is recorded once, at the start, and every later step compares against it. The switchover
step never asks twice: the candidate leading on a higher timeline means done; a request that was sent when the worker
was lost is waited for, not repeated; and Patroni itself turns down a late duplicate, since the request names the
leader it moves from ("leader name does not match").

CloudNativePG has no Patroni: on the `cnpg` profile each step hands over to `jobs.pg_switchover_cnpg`, which asks the
operator through its Cluster resource (`status.targetPrimary`, as `kubectl cnpg promote` does).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import Field

from jobs import pg_switchover_cnpg as cnpg
from jobs.pgkube import params as pg
from jobs.pgkube.health import not_streaming, patroni_view
from jobs.pgkube.kube import Kube, PodView
from jobs.pgkube.params import ClusterParams, PgSettings, Refused, pg_job_type
from jobs.pgkube.patroni import ClusterView, Member, Patroni, PatroniRefused, PatroniUnavailable
from jobs.pgkube.profiles import Profile
from jobs.pgkube.waiting import Seen, WaitTimeout, WontHeal, wait_until
from service.jobtypes import Step, StepContext

T = TypeVar("T")
# Patroni's answer when it gave up polling: the switchover may still happen, so the request counts as in flight.
STATUS_UNKNOWN = "Switchover status unknown"
DRY_RUN_WAIT = "dry run: no switchover asked, nothing to wait for"


class SwitchoverParams(ClusterParams):
    candidate: Annotated[
        pg.PodName | None, Field(description="the replica to promote (default: the streaming replica with least lag)")
    ] = None
    max_lag_bytes: pg.MaxLagBytes = pg.MIB
    switchover_timeout_s: Annotated[pg.Seconds, Field(description="for Patroni to hand the leadership over")] = 120
    settle_timeout_s: Annotated[pg.Seconds, Field(description="for the other members to stream from the new one")] = 300


@dataclass
class Switch:
    """One step's view of the job: the cluster's pods and Patroni, and the topology recorded at the start."""

    params: SwitchoverParams
    kube: Kube
    profile: Profile
    patroni: Patroni
    poll_s: float
    ctx: StepContext

    @classmethod
    def of(cls, ctx: StepContext, params: SwitchoverParams) -> Switch:
        kube = pg.kube_for(ctx, params)
        settings: PgSettings = ctx.settings
        patroni = Patroni(kube, params.namespace)
        return cls(params, kube, pg.profile_for(ctx, params), patroni, settings.pg_rebuild_poll_interval_s, ctx)

    @property
    def topology(self) -> dict[str, Any]:
        recorded: dict[str, Any] | None = self.ctx.state.get("topology")
        if recorded is None:
            raise RuntimeError("no topology recorded: step read-topology has not run")
        return recorded

    @property
    def cnpg(self) -> bool:
        """CloudNativePG: no Patroni; the switchover goes through its Cluster resource (jobs.pg_switchover_cnpg)."""
        return self.profile.owner == "Cluster"

    async def members(self) -> list[PodView]:
        return await self.kube.pods(self.params.namespace, self.profile.selector(self.params.cluster))

    async def look(self) -> tuple[list[PodView], ClusterView, Member | None]:
        """The members, Patroni's view and the candidate if it has taken over; fails when a member other than the
        recorded leader or the candidate leads."""
        pods = await self.members()
        view = await self.view(pods)
        _usurper(view, self.topology)
        return pods, view, _took_over(view, self.topology)

    async def wait(self, probe: Callable[[], Awaitable[Seen[T]]], what: str, timeout_s: float) -> T:
        return await wait_until(self.ctx, probe, what=what, timeout_s=timeout_s, interval_s=self.poll_s)

    async def view(self, pods: list[PodView] | None = None) -> ClusterView:
        """GET /cluster, asking the labelled primary first, then the other members."""
        pods = pods if pods is not None else await self.members()
        return await patroni_view(self.kube, self.params.namespace, self.profile, pods)


# Checks


def _disqualified(member: Member, leader: Member, view: ClusterView, max_lag: int) -> str | None:
    """Why `member` may not take over from `leader` now, in words for the job's detail; None if it may."""
    reason = not_streaming(member, leader, max_lag)
    if reason is not None:
        return reason
    if member.nofailover:
        return f"{member.name} is tagged nofailover: Patroni will not promote it"
    sync = [m.name for m in view.sync_standbys]
    if sync and member.name not in sync:
        return f"{member.name} is not the synchronous standby ({', '.join(sync)}) of a cluster in synchronous mode"
    return None


def _one_leader(view: ClusterView, cluster: str) -> Member:
    leaders = view.leaders
    if len(leaders) != 1:
        found = ", ".join(m.name for m in leaders) or "none"
        raise Refused(f"cluster {cluster} needs exactly one leader, Patroni shows {len(leaders)}: {found}")
    return leaders[0]


def _best(view: ClusterView, leader: Member, max_lag: int) -> Member:
    """The replica with the least lag among those that may take over."""
    others = [m for m in view.members if not m.leads]
    fit = [m for m in others if _disqualified(m, leader, view, max_lag) is None]
    if not fit:
        reasons = "; ".join(_disqualified(m, leader, view, max_lag) or "" for m in others) or "no replicas"
        raise Refused(f"no replica may take over from {leader.name}: {reasons}")
    return min(fit, key=lambda m: (m.lag or 0, m.name))


def _check(s: Switch, view: ClusterView) -> Member:
    """Every refusal, against the recorded topology; the candidate when none applies."""
    topology = s.topology
    leader = _one_leader(view, s.params.cluster)
    if leader.name != topology["leader"]:
        raise Refused(f"the leader is {leader.name}, not {topology['leader']} as when the job started")
    if view.paused:
        raise Refused(f"cluster {s.params.cluster} is paused (Patroni maintenance mode): resume it first")
    candidate = view.member(topology["candidate"])
    if candidate is None:
        names = ", ".join(m.name for m in view.members)
        raise Refused(f"candidate {topology['candidate']} is not a member of cluster {s.params.cluster} ({names})")
    reason = _disqualified(candidate, leader, view, s.params.max_lag_bytes)
    if reason is not None:
        raise Refused(f"candidate {reason}")
    return candidate


def _took_over(view: ClusterView, topology: dict[str, Any]) -> Member | None:
    """The candidate, if it leads on a later timeline than the recorded leader's: the switchover is done."""
    leaders = view.leaders
    if len(leaders) == 1 and leaders[0].name == topology["candidate"]:
        if (leaders[0].timeline or 0) > (topology["timeline"] or 0):
            return leaders[0]
    return None


def _usurper(view: ClusterView, topology: dict[str, Any]) -> None:
    """Fails when neither the recorded leader nor the candidate leads: the cluster failed over elsewhere."""
    others = [m.name for m in view.leaders if m.name not in (topology["leader"], topology["candidate"])]
    if others:
        raise WontHeal(f"{', '.join(others)} leads instead of {topology['candidate']} (was {topology['leader']})")


# Steps


async def read_topology(ctx: StepContext, params: SwitchoverParams) -> str:
    """Reads the members and Patroni's view of the cluster; changes nothing. Records, once, the leader, its timeline
    and the candidate (the named one, or the replica with least lag that may take over): what every later step,
    on whichever worker, compares against. Done when recorded; refuses a cluster without exactly one leader."""
    s = Switch.of(ctx, params)
    if s.cnpg:
        return await cnpg.read_topology(s)
    topology = ctx.state.get("topology")
    view = await s.view()
    if topology is None:
        leader = _one_leader(view, params.cluster)
        candidate = params.candidate or _best(view, leader, params.max_lag_bytes).name
        topology = {
            "leader": leader.name,
            "timeline": leader.timeline,
            "candidate": candidate,
            "members": [m.describe() for m in view.members],
        }
        await ctx.remember(topology=topology)
    chosen = "named" if params.candidate else "the replica with least lag that may take over"
    return (
        f"leader {topology['leader']} on timeline {topology['timeline']}; members: {', '.join(topology['members'])}; "
        f"candidate {topology['candidate']} ({chosen})"
    )


async def check_candidate(ctx: StepContext, params: SwitchoverParams) -> str:
    """Reads Patroni's view; changes nothing. Done when the recorded leader is the only leader, the cluster is not
    paused and the candidate is a member, streaming on the leader's timeline within the lag limit, not tagged
    nofailover, and the synchronous standby in synchronous mode; refuses otherwise."""
    s = Switch.of(ctx, params)
    if s.cnpg:
        return await cnpg.check_candidate(s)
    view = await s.view()
    done = _took_over(view, s.topology)
    if done is not None:
        return f"{done.name} already leads on timeline {done.timeline}: the switchover happened earlier in this job"
    candidate = _check(s, view)
    sync = ", the synchronous standby" if view.sync_standbys else ""
    return (
        f"leader {s.topology['leader']} (timeline {s.topology['timeline']}), cluster not paused; candidate "
        f"{candidate.name} streaming on timeline {candidate.timeline}, lag {candidate.lag} bytes "
        f"(max_lag_bytes {params.max_lag_bytes}), may be promoted{sync}"
    )


async def switchover(ctx: StepContext, params: SwitchoverParams) -> str:
    """Asks Patroni, on the leader, to switch over to the candidate, after checking everything once more. Done when
    Patroni answers that the candidate took over, or the candidate already leads on a later timeline (a re-run sends
    nothing). A request sent before the worker was lost is waited for, never sent again while it may still act.
    Patroni's 412/400 fail the step with its words; its 503 is retried."""
    s = Switch.of(ctx, params)
    if s.cnpg:
        return await cnpg.switchover(s)
    topology = s.topology
    _, view, done = await s.look()
    if done is not None:
        return f"{done.name} already leads on timeline {done.timeline}: switched over earlier in this job, nothing sent"
    if params.dry_run:
        _check(s, view)
        return f"dry run: would ask Patroni to switch over from {topology['leader']} to {topology['candidate']}"
    if ctx.state.get("switchover_sent"):
        # The worker that sent the request was lost before it heard the answer: wait for that one to act.
        view = await _handover(s, "waiting for the switchover asked before the worker was lost")
        done = _took_over(view, topology)
        if done is not None:
            return f"{done.name} leads on timeline {done.timeline}: the switchover asked before the worker was lost"
    _check(s, view)
    await ctx.remember(switchover_sent=True)
    try:
        said = await s.patroni.switchover(
            topology["leader"],
            leader=topology["leader"],
            candidate=topology["candidate"],
            timeout_s=params.switchover_timeout_s,
        )
    except PatroniRefused:
        # A duplicate that raced the first request's success is refused ("leader name does not match"): done.
        done = _took_over(await s.view(), topology)
        if done is not None:
            return f"{done.name} leads on timeline {done.timeline}: switched over (Patroni refused a second request)"
        raise
    except PatroniUnavailable as exc:
        if exc.answer != STATUS_UNKNOWN:  # Patroni says no switchover is under way: the next try may send again
            await ctx.remember(switchover_sent=False)
        raise
    if f'"{topology["candidate"]}"' not in said or " instead of " in said:
        raise WontHeal(f"Patroni: {said}")
    return f"Patroni: {said}"


async def _handover(s: Switch, what: str) -> ClusterView:
    """Waits until the candidate has taken over, or the switchover timeout passes; the last view."""

    async def probe() -> Seen[ClusterView]:
        _, view, done = await s.look()
        if done is not None:
            return Seen("", view)
        return Seen(f"leader: {', '.join(m.name for m in view.leaders) or 'none'}")

    try:
        return await s.wait(probe, what, s.params.switchover_timeout_s)
    except WaitTimeout:  # the request never took effect: the caller may send it (again)
        return await s.view()


async def wait_new_leader(ctx: StepContext, params: SwitchoverParams) -> str:
    """Changes nothing; polls. Done when the candidate leads on a later timeline than the recorded one and the role
    labels follow (the candidate labelled primary, no other member). Fails fast when another member leads."""
    if params.dry_run:
        return DRY_RUN_WAIT
    s = Switch.of(ctx, params)
    if s.cnpg:
        return await cnpg.wait_new_leader(s)
    topology = s.topology

    async def probe() -> Seen[str]:
        pods, view, done = await s.look()
        labelled = [p.name for p in pods if s.profile.is_primary(p)]
        if done is not None and labelled == [done.name]:
            label = s.profile.role(next(p for p in pods if p.name == done.name))
            return Seen(
                "",
                f"{done.name} leads on timeline {done.timeline} (was {topology['leader']} on timeline "
                f"{topology['timeline']}); labelled {label}",
            )
        leaders = ", ".join(f"{m.name} (timeline {m.timeline})" for m in view.leaders) or "none"
        return Seen(f"leader: {leaders}; labelled primary: {', '.join(labelled) or 'none'}")

    return await s.wait(probe, f"waiting for {topology['candidate']} to lead", params.switchover_timeout_s)


async def wait_replicas(ctx: StepContext, params: SwitchoverParams) -> str:
    """Changes nothing; polls. Done when every other member is labelled replica and streams from the new leader
    on its timeline within the lag limit. Fails fast when another member than the candidate leads."""
    if params.dry_run:
        return DRY_RUN_WAIT
    s = Switch.of(ctx, params)
    if s.cnpg:
        return await cnpg.wait_replicas(s)

    async def probe() -> Seen[str]:
        pods, view, leader = await s.look()
        if leader is None:
            raise WontHeal(f"{s.topology['candidate']} no longer leads: {', '.join(m.name for m in view.leaders)}")
        others = [p for p in pods if p.name != leader.name]
        behind = [_lagging(s, p, view.member(p.name), leader) for p in others]
        remaining = [text for text in behind if text is not None]
        if not remaining:
            streaming = ", ".join((view.member(p.name) or leader).describe() for p in others)
            return Seen("", f"{streaming} stream from {leader.name}")
        return Seen(f"remaining: {', '.join(remaining)}")

    what = f"waiting for the members to stream from {s.topology['candidate']}"
    return await s.wait(probe, what, params.settle_timeout_s)


def _lagging(s: Switch, pod: PodView, member: Member | None, leader: Member) -> str | None:
    """What keeps `pod` from counting as a replica of `leader`; None when it is one."""
    if member is None:
        return f"{pod.name} (not in Patroni's member list)"
    if not s.profile.is_replica(pod):
        label = s.profile.role(pod)
        return f"{pod.name} ({member.state}, {f'labelled {label}' if label else 'no role label yet'})"
    reason = not_streaming(member, leader, s.params.max_lag_bytes)
    return None if reason is None else f"{member.describe()}: {reason}"


STEPS: list[Step[SwitchoverParams]] = [
    Step("read-topology", read_topology, timeout_s=60, max_attempts=5),
    Step("check-candidate", check_candidate, timeout_s=60, max_attempts=5),
    # Bounded by the params' timeouts (the request, and a lost worker's request waited for); the deadline is a backstop.
    Step("switchover", switchover, timeout_s=2 * pg.MAX_WAIT_S + 120, max_attempts=5),
    Step("wait-new-leader", wait_new_leader, timeout_s=pg.MAX_WAIT_S + 120, max_attempts=3),
    Step("wait-replicas", wait_replicas, timeout_s=pg.MAX_WAIT_S + 120, max_attempts=3),
]

JOB = pg_job_type(
    "pg-switchover",
    (
        "Move a cluster's primary to a replica (`candidate`, or the streaming one with least lag) through "
        "Patroni's REST API (on CloudNativePG: its Cluster's status.targetPrimary, as `kubectl cnpg promote` does), "
        "then wait until it leads on a new timeline and every other member follows it. Refuses an unhealthy "
        "candidate, a paused cluster and a leader other than the one recorded at the start before asking anything; "
        "`dry_run` only runs the checks."
    ),
    SwitchoverParams,
    STEPS,
    PgSettings,
)
