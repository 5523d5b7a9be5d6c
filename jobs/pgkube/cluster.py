"""A Patroni cluster as the pg-* job types see it from a step: its pods, Patroni's view of its members, cooperative
waits on both; and the health checks every such job makes of a member (streaming from the leader, on its timeline,
within the lag limit), in words for the job's detail.

    c = PatroniCluster.of(ctx, params)
    view = await c.view()
    leader = one_leader(view, params.cluster)
    reason = not_streaming(view.member("pg-1"), leader, params.max_lag_bytes)  # None: healthy
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from jobs.pgkube import params as pg
from jobs.pgkube.kube import Kube, KubeError, PodView
from jobs.pgkube.params import PatroniParams, PgSettings, Refused
from jobs.pgkube.patroni import ClusterView, Member, Patroni, PatroniRefused
from jobs.pgkube.profiles import Profile
from jobs.pgkube.waiting import Seen, wait_until
from service.jobtypes import StepContext, TransientError

T = TypeVar("T")


@dataclass
class PatroniCluster:
    """One step's view of a Patroni cluster: its pods and Patroni, reached from the job's context."""

    params: PatroniParams
    kube: Kube
    profile: Profile
    patroni: Patroni
    poll_s: float
    ctx: StepContext

    @classmethod
    def of(cls, ctx: StepContext, params: PatroniParams) -> PatroniCluster:
        kube = pg.kube_for(ctx, params)
        settings: PgSettings = ctx.settings
        patroni = Patroni(kube, params.namespace)
        return cls(params, kube, pg.profile_for(ctx, params), patroni, settings.pg_rebuild_poll_interval_s, ctx)

    async def members(self) -> list[PodView]:
        return await self.kube.pods(self.params.namespace, self.profile.selector(self.params.cluster))

    async def view(self, pods: list[PodView] | None = None) -> ClusterView:
        """GET /cluster, asking the labelled primary first, then the other members."""
        pods = pods if pods is not None else await self.members()
        ordered = sorted(pods, key=lambda p: (not self.profile.is_primary(p), p.deleting, p.name))
        return await self.patroni.cluster([p.name for p in ordered])

    async def view_or_why(self, pods: list[PodView]) -> ClusterView | str:
        """Patroni's view, or why there is none: the profile's operator has no Patroni (CloudNativePG), or no
        member's Patroni answered (nothing listens, the Role lacks `pods/proxy`, the API server refused). A job that
        can do without goes by the labels and says why."""
        if not self.profile.patroni:
            return f"profile {self.profile.name} has no Patroni"
        try:
            return await self.view(pods)
        except (TransientError, KubeError, PatroniRefused) as exc:
            return f"Patroni did not answer ({exc})"

    async def wait(self, probe: Callable[[], Awaitable[Seen[T]]], what: str, timeout_s: float) -> T:
        return await wait_until(self.ctx, probe, what=what, timeout_s=timeout_s, interval_s=self.poll_s)


def recorded(ctx: StepContext, key: str, step: str) -> dict[str, Any]:
    """What an earlier step of the job recorded under `key` (the topology found at the start, ...)."""
    found: dict[str, Any] | None = ctx.state.get(key)
    if found is None:
        raise RuntimeError(f"no {key} recorded: step {step} has not run")
    return found


# Checks


def not_streaming(member: Member, leader: Member, max_lag: int) -> str | None:
    """Why `member` is not a replica streaming from `leader` within the lag limit; None when it is."""
    if member.leads:
        return f"{member.name} is the leader"
    if member.state != "streaming":
        return f"{member.name} is {member.state or 'in no state'}, not streaming"
    if member.timeline != leader.timeline:
        return f"{member.name} is on timeline {member.timeline}, the leader {leader.name} on {leader.timeline}"
    if member.lag is None:
        return f"{member.name}'s lag is unknown"
    if member.lag > max_lag:
        return f"{member.name} lags {member.lag} bytes behind the leader, more than max_lag_bytes {max_lag}"
    return None


def disqualified(member: Member, leader: Member, view: ClusterView, max_lag: int) -> str | None:
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


def one_leader(view: ClusterView, cluster: str) -> Member:
    leaders = view.leaders
    if len(leaders) != 1:
        found = ", ".join(m.name for m in leaders) or "none"
        raise Refused(f"cluster {cluster} needs exactly one leader, Patroni shows {len(leaders)}: {found}")
    return leaders[0]


def not_paused(view: ClusterView, cluster: str) -> None:
    if view.paused:
        raise Refused(f"cluster {cluster} is paused (Patroni maintenance mode): resume it first")


def best(view: ClusterView, leader: Member, max_lag: int) -> Member:
    """The replica with the least lag among those that may take over."""
    others = [m for m in view.members if not m.leads]
    fit = [m for m in others if disqualified(m, leader, view, max_lag) is None]
    if not fit:
        reasons = "; ".join(disqualified(m, leader, view, max_lag) or "" for m in others) or "no replicas"
        raise Refused(f"no replica may take over from {leader.name}: {reasons}")
    return min(fit, key=lambda m: (m.lag or 0, m.name))
