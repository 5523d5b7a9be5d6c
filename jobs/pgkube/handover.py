"""Moving a Patroni cluster's leadership, crash-safe: what pg-switchover is made of, and what pg-restart does before
it restarts the primary.

    h = Handover.under(ctx, params, key="topology", sent="switchover_sent")  # what it keeps in ctx.state
    view = await h.view()
    leader = one_leader(view, params.cluster)
    ...
    said = await h.switch_over()     # checks once more, asks Patroni once, recognises a switchover already done
    await h.wait_new_leader()
    await h.wait_replicas()

The topology a handover compares against is recorded once by the job, in its state under `key`: the `leader`, its
`timeline` and the `candidate`. Every check is made against it on whichever worker the step runs: the candidate
leading on a later timeline means done; a request sent before the worker was lost is waited for, never sent again
while it may still act; and Patroni itself turns down a late duplicate, since the request names the leader it moves
from ("leader name does not match").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from jobs.pgkube import params as pg
from jobs.pgkube.cluster import PatroniCluster, disqualified, not_paused, not_streaming, one_leader, recorded
from jobs.pgkube.kube import PodView
from jobs.pgkube.params import PatroniParams, Refused
from jobs.pgkube.patroni import ClusterView, Member, PatroniRefused, PatroniUnavailable
from jobs.pgkube.waiting import Seen, WaitTimeout, WontHeal
from service.jobtypes import StepContext

# Patroni's answer when it gave up polling: the switchover may still happen, so the request counts as in flight.
STATUS_UNKNOWN = "Switchover status unknown"


class HandoverParams(PatroniParams):
    """What a job that moves the leadership needs beyond the lag limit: how long each part may take."""

    switchover_timeout_s: Annotated[pg.Seconds, Field(description="for Patroni to hand the leadership over")] = 120
    settle_timeout_s: Annotated[pg.Seconds, Field(description="for the other members to stream from the new one")] = 300


def took_over(view: ClusterView, topology: dict[str, Any]) -> Member | None:
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


@dataclass
class Handover(PatroniCluster):
    """One step's view of a cluster whose leadership moves: its pods and Patroni, and the topology recorded under
    `key` in the job's state (and under `sent`, whether a switchover request may be with Patroni)."""

    params: HandoverParams
    key: str = "topology"
    sent: str = "switchover_sent"

    @classmethod
    def under(cls, ctx: StepContext, params: HandoverParams, key: str, sent: str) -> Handover:
        return cls(**vars(PatroniCluster.of(ctx, params)) | {"params": params, "key": key, "sent": sent})

    @property
    def recorded(self) -> bool:
        return self.ctx.state.get(self.key) is not None

    @property
    def topology(self) -> dict[str, Any]:
        return recorded(self.ctx, self.key, "the one that records it")

    async def look(self) -> tuple[list[PodView], ClusterView, Member | None]:
        """The members, Patroni's view and the candidate if it has taken over; fails when a member other than the
        recorded leader or the candidate leads."""
        pods = await self.members()
        view = await self.view(pods)
        _usurper(view, self.topology)
        return pods, view, took_over(view, self.topology)

    def check(self, view: ClusterView) -> Member:
        """Every refusal, against the recorded topology; the candidate when none applies."""
        topology, cluster = self.topology, self.params.cluster
        leader = one_leader(view, cluster)
        if leader.name != topology["leader"]:
            raise Refused(f"the leader is {leader.name}, not {topology['leader']} as when the job started")
        not_paused(view, cluster)
        candidate = view.member(topology["candidate"])
        if candidate is None:
            names = ", ".join(m.name for m in view.members)
            raise Refused(f"candidate {topology['candidate']} is not a member of cluster {cluster} ({names})")
        reason = disqualified(candidate, leader, view, self.params.max_lag_bytes)
        if reason is not None:
            raise Refused(f"candidate {reason}")
        return candidate

    async def switch_over(self) -> str:
        """Asks Patroni, on the leader, to switch over to the candidate, after checking everything once more. Done
        when Patroni answers that the candidate took over, or the candidate already leads on a later timeline (a
        re-run sends nothing). A request sent before the worker was lost is waited for, never sent again while it
        may still act. Patroni's 412/400 fail with its words; its 503 is retried."""
        topology, sent = self.topology, self.sent
        _, view, done = await self.look()
        if done is not None:
            earlier = "switched over earlier in this job, nothing sent"
            return f"{done.name} already leads on timeline {done.timeline}: {earlier}"
        if self.params.dry_run:
            self.check(view)
            return f"dry run: would ask Patroni to switch over from {topology['leader']} to {topology['candidate']}"
        if self.ctx.state.get(sent):
            # The worker that sent the request was lost before it heard the answer: wait for that one to act.
            view = await self._handover("waiting for the switchover asked before the worker was lost")
            done = took_over(view, topology)
            if done is not None:
                return f"{done.name} leads on timeline {done.timeline}: the switchover asked before the worker was lost"
        self.check(view)
        await self.ctx.remember(**{sent: True})
        try:
            said = await self.patroni.switchover(
                topology["leader"],
                leader=topology["leader"],
                candidate=topology["candidate"],
                timeout_s=self.params.switchover_timeout_s,
            )
        except PatroniRefused:
            # A duplicate that raced the first request's success is refused ("leader name does not match"): done.
            done = took_over(await self.view(), topology)
            if done is not None:
                return (
                    f"{done.name} leads on timeline {done.timeline}: switched over (Patroni refused a second request)"
                )
            raise
        except PatroniUnavailable as exc:
            if exc.answer != STATUS_UNKNOWN:  # Patroni says no switchover is under way: the next try may send again
                await self.ctx.remember(**{sent: False})
            raise
        if f'"{topology["candidate"]}"' not in said or " instead of " in said:
            raise WontHeal(f"Patroni: {said}")
        return f"Patroni: {said}"

    async def _handover(self, what: str) -> ClusterView:
        """Waits until the candidate has taken over, or the switchover timeout passes; the last view."""

        async def probe() -> Seen[ClusterView]:
            _, view, done = await self.look()
            if done is not None:
                return Seen("", view)
            return Seen(f"leader: {', '.join(m.name for m in view.leaders) or 'none'}")

        try:
            return await self.wait(probe, what, self.params.switchover_timeout_s)
        except WaitTimeout:  # the request never took effect: the caller may send it (again)
            return await self.view()

    async def wait_new_leader(self) -> str:
        """Done when the candidate leads on a later timeline than the recorded one and the role labels follow (the
        candidate labelled primary, no other member). Fails fast when another member leads."""
        topology = self.topology

        async def probe() -> Seen[str]:
            pods, view, done = await self.look()
            labelled = [p.name for p in pods if self.profile.is_primary(p)]
            if done is not None and labelled == [done.name]:
                label = self.profile.role(next(p for p in pods if p.name == done.name))
                return Seen(
                    "",
                    f"{done.name} leads on timeline {done.timeline} (was {topology['leader']} on timeline "
                    f"{topology['timeline']}); labelled {label}",
                )
            leaders = ", ".join(f"{m.name} (timeline {m.timeline})" for m in view.leaders) or "none"
            return Seen(f"leader: {leaders}; labelled primary: {', '.join(labelled) or 'none'}")

        what = f"waiting for {topology['candidate']} to lead"
        return await self.wait(probe, what, self.params.switchover_timeout_s)

    async def wait_replicas(self) -> str:
        """Done when every other member is labelled replica and streams from the new leader on its timeline within
        the lag limit. Fails fast when another member than the candidate leads."""

        async def probe() -> Seen[str]:
            pods, view, leader = await self.look()
            if leader is None:
                leaders = ", ".join(m.name for m in view.leaders)
                raise WontHeal(f"{self.topology['candidate']} no longer leads: {leaders}")
            others = [p for p in pods if p.name != leader.name]
            behind = [self.lagging(p, view.member(p.name), leader) for p in others]
            remaining = [text for text in behind if text is not None]
            if not remaining:
                streaming = ", ".join((view.member(p.name) or leader).describe() for p in others)
                return Seen("", f"{streaming} stream from {leader.name}")
            return Seen(f"remaining: {', '.join(remaining)}")

        what = f"waiting for the members to stream from {self.topology['candidate']}"
        return await self.wait(probe, what, self.params.settle_timeout_s)

    def lagging(self, pod: PodView, member: Member | None, leader: Member) -> str | None:
        """What keeps `pod` from counting as a replica of `leader`; None when it is one."""
        if member is None:
            return f"{pod.name} (not in Patroni's member list)"
        if not self.profile.is_replica(pod):
            label = self.profile.role(pod)
            return f"{pod.name} ({member.state}, {f'labelled {label}' if label else 'no role label yet'})"
        reason = not_streaming(member, leader, self.params.max_lag_bytes)
        return None if reason is None else f"{member.describe()}: {reason}"
