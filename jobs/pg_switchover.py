"""`pg-switchover`: move a Patroni cluster's leadership to a named replica, or to the best one, through Patroni.

Patroni is asked through the Kubernetes API's pod proxy (`jobs.pgkube.patroni`). Before anything changes, the job
records the topology it found (leader, timeline, candidate) and refuses a cluster that is not exactly one leader,
the recorded one; a paused cluster; and a candidate that is not a member, not `streaming`, not on the leader's
timeline, lagging more than `max_lag_bytes`, tagged `nofailover`, or not the synchronous standby of a cluster in
synchronous mode. Then one switchover, then the waits: the candidate leads on a higher timeline with the role labels
following, and every other member streams from it within the lag limit.

Crash-safe: the topology is recorded once, at the start, and every later step compares against it. The switchover
step never asks twice: the candidate leading on a higher timeline means done; a request that was sent when the worker
was lost is waited for, not repeated; and Patroni itself turns down a late duplicate, since the request names the
leader it moves from ("leader name does not match"). The handover itself, and the checks, are
`jobs.pgkube.handover`'s, shared with pg-restart.

CloudNativePG has no Patroni: on the `cnpg` profile each step hands over to `jobs.pg_switchover_cnpg`, which asks the
operator through its Cluster resource (`status.targetPrimary`, as `kubectl cnpg promote` does).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import Field

from jobs import pg_switchover_cnpg as cnpg
from jobs.pgkube import params as pg
from jobs.pgkube.cluster import best, one_leader
from jobs.pgkube.handover import Handover, HandoverParams, took_over
from jobs.pgkube.params import PgSettings, pg_job_type
from service.jobtypes import Step, StepContext

DRY_RUN_WAIT = "dry run: no switchover asked, nothing to wait for"


class SwitchoverParams(HandoverParams):
    # CloudNativePG: through its Cluster resource (status.targetPrimary), jobs.pg_switchover_cnpg.
    cnpg_refusal: ClassVar[str | None] = None

    candidate: Annotated[
        pg.PodName | None, Field(description="the replica to promote (default: the streaming replica with least lag)")
    ] = None


def _handover(ctx: StepContext, params: SwitchoverParams) -> Handover:
    return Handover.under(ctx, params, key="topology", sent="switchover_sent")


def _on_cnpg(h: Handover) -> bool:
    """CloudNativePG owns the pods through its Cluster resource, and has no Patroni to ask."""
    return h.profile.owner == "Cluster"


# Steps


async def read_topology(ctx: StepContext, params: SwitchoverParams) -> str:
    """Reads the members and Patroni's view of the cluster; changes nothing. Records, once, the leader, its timeline
    and the candidate (the named one, or the replica with least lag that may take over): what every later step,
    on whichever worker, compares against. Done when recorded; refuses a cluster without exactly one leader."""
    h = _handover(ctx, params)
    if _on_cnpg(h):
        return await cnpg.read_topology(h, params.candidate)
    view = await h.view()
    if not h.recorded:
        leader = one_leader(view, params.cluster)
        candidate = params.candidate or best(view, leader, params.max_lag_bytes).name
        topology: dict[str, Any] = {
            "leader": leader.name,
            "timeline": leader.timeline,
            "candidate": candidate,
            "members": [m.describe() for m in view.members],
        }
        await ctx.remember(topology=topology)
    topology = h.topology
    chosen = "named" if params.candidate else "the replica with least lag that may take over"
    return (
        f"leader {topology['leader']} on timeline {topology['timeline']}; members: {', '.join(topology['members'])}; "
        f"candidate {topology['candidate']} ({chosen})"
    )


async def check_candidate(ctx: StepContext, params: SwitchoverParams) -> str:
    """Reads Patroni's view; changes nothing. Done when the recorded leader is the only leader, the cluster is not
    paused and the candidate is a member, streaming on the leader's timeline within the lag limit, not tagged
    nofailover, and the synchronous standby in synchronous mode; refuses otherwise."""
    h = _handover(ctx, params)
    if _on_cnpg(h):
        return await cnpg.check_candidate(h)
    view = await h.view()
    done = took_over(view, h.topology)
    if done is not None:
        return f"{done.name} already leads on timeline {done.timeline}: the switchover happened earlier in this job"
    candidate = h.check(view)
    sync = ", the synchronous standby" if view.sync_standbys else ""
    return (
        f"leader {h.topology['leader']} (timeline {h.topology['timeline']}), cluster not paused; candidate "
        f"{candidate.name} streaming on timeline {candidate.timeline}, lag {candidate.lag} bytes "
        f"(max_lag_bytes {params.max_lag_bytes}), may be promoted{sync}"
    )


async def switchover(ctx: StepContext, params: SwitchoverParams) -> str:
    """Asks Patroni, on the leader, to switch over to the candidate, after checking everything once more. Done when
    Patroni answers that the candidate took over, or the candidate already leads on a later timeline (a re-run sends
    nothing). A request sent before the worker was lost is waited for, never sent again while it may still act.
    Patroni's 412/400 fail the step with its words; its 503 is retried."""
    h = _handover(ctx, params)
    return await (cnpg.switchover(h) if _on_cnpg(h) else h.switch_over())


async def wait_new_leader(ctx: StepContext, params: SwitchoverParams) -> str:
    """Changes nothing; polls. Done when the candidate leads on a later timeline than the recorded one and the role
    labels follow (the candidate labelled primary, no other member). Fails fast when another member leads."""
    if params.dry_run:
        return DRY_RUN_WAIT
    h = _handover(ctx, params)
    return await (cnpg.wait_new_leader(h) if _on_cnpg(h) else h.wait_new_leader())


async def wait_replicas(ctx: StepContext, params: SwitchoverParams) -> str:
    """Changes nothing; polls. Done when every other member is labelled replica and streams from the new leader
    on its timeline within the lag limit. Fails fast when another member than the candidate leads."""
    if params.dry_run:
        return DRY_RUN_WAIT
    h = _handover(ctx, params)
    return await (cnpg.wait_replicas(h) if _on_cnpg(h) else h.wait_replicas())


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
        "Move a Patroni cluster's leadership to a replica (`candidate`, or the streaming one with least lag) "
        "through Patroni's REST API, then wait until it leads on a new timeline and every other member streams "
        "from it. Refuses an unhealthy candidate, a paused cluster and a leader other than the one recorded at "
        "the start before asking anything; `dry_run` only runs the checks."
    ),
    SwitchoverParams,
    STEPS,
    PgSettings,
)
