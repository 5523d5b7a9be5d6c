"""`pg-reinit`: re-clone one replica of a Patroni cluster in place, through Patroni's POST /reinitialize.

Unlike pg-rebuild, nothing of Kubernetes is deleted: the pod and its volume stay, Patroni wipes the member's data
directory and takes a fresh basebackup from the leader. Before anything changes the job refuses the leader (Patroni
re-clones replicas only), a pod that is not a member, a cluster without exactly one leader, and a member already
re-cloning: two overlapping re-clones of one data directory have destroyed it upstream. Then one request, then the
wait: PostgreSQL started again on the fresh copy, the member streaming from the leader within the lag limit. A
basebackup that keeps failing (Patroni begins one after another) fails the job fast.

Crash-safe as `jobs.pgkube.memberops` makes it: the request is recorded before it is sent, and a run resumed on
another worker recognises the re-clone under way or done by the member's state and its PostgreSQL's start time.
CloudNativePG has no Patroni and is refused at submission.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import Field

from jobs.pgkube import params as pg
from jobs.pgkube.cluster import PatroniCluster, one_leader, recorded
from jobs.pgkube.memberops import RECLONE, ask_once, wait_back
from jobs.pgkube.params import PatroniParams, PgSettings, Refused, pg_job_type
from jobs.pgkube.patroni import PatroniUnavailable
from service.jobtypes import Step, StepContext

MARK = "reinit"  # the job's state: the member, its start time before, whether the request was sent
DRY_RUN_WAIT = "dry run: no re-clone asked, nothing to wait for"


class ReinitParams(PatroniParams):
    cnpg_refusal: ClassVar[str] = "a re-clone through its Cluster resource is not supported yet"

    pod: Annotated[pg.PodName, Field(description="the replica to re-clone from the leader")]
    reinit_timeout_s: Annotated[
        pg.Seconds, Field(description="for the basebackup and the member streaming again afterwards")
    ] = 1800


def _topology(ctx: StepContext) -> dict[str, Any]:
    return recorded(ctx, "topology", "check-member")


async def check_member(ctx: StepContext, params: ReinitParams) -> str:
    """Reads Patroni's view; changes nothing. Records, once, the leader, its timeline and the members. Done when the
    cluster has exactly one leader and the pod is one of its replicas, not already re-cloning; refuses otherwise."""
    c = PatroniCluster.of(ctx, params)
    view = await c.view()
    leader = one_leader(view, params.cluster)
    member = view.member(params.pod)
    if ctx.state.get(MARK) is None:  # once the re-clone is asked, the member shows it: no refusal any more
        if member is None:
            names = ", ".join(m.name for m in view.members)
            raise Refused(f"{params.pod} is not a member of cluster {params.cluster} ({names})")
        if member.leads:
            raise Refused(f"{params.pod} is the leader: Patroni re-clones replicas only; switch over first")
        if member.state == "creating replica":
            raise Refused(
                f"{params.pod} is already being re-cloned (creating replica): a second re-clone over the first "
                "could wipe the data directory it is copying into"
            )
    if ctx.state.get("topology") is None:
        members = [m.describe() for m in view.members]
        await ctx.remember(topology={"leader": leader.name, "timeline": leader.timeline, "members": members})
    topology = _topology(ctx)
    return (
        f"leader {topology['leader']} on timeline {topology['timeline']}; members: {', '.join(topology['members'])}; "
        f"{params.pod} is a replica that may be re-cloned"
    )


async def reinitialize(ctx: StepContext, params: ReinitParams) -> str:
    """Asks Patroni on the member to re-clone it (POST /reinitialize), once: a re-clone already under way or done
    for this job sends nothing. Patroni's refusals ("I am the leader", "Cluster has no leader") fail the step."""
    leader = _topology(ctx)["leader"]
    if params.dry_run:
        return f"dry run: would ask Patroni on {params.pod} to re-clone it from the leader {leader}"
    c = PatroniCluster.of(ctx, params)

    async def send() -> str:
        return await c.patroni.reinitialize(params.pod)

    try:
        _, said = await ask_once(c, RECLONE, params.pod, send, key=MARK, timeout_s=params.reinit_timeout_s)
    except PatroniUnavailable as exc:
        if exc.answer.endswith("can not reinitialize"):  # the leader changed since the check: not by waiting
            raise Refused(f"Patroni on {params.pod}: {exc.answer}") from None
        raise
    return said


async def wait_streaming(ctx: StepContext, params: ReinitParams) -> str:
    """Changes nothing; polls. Done when the member's PostgreSQL started again on the fresh copy and it streams from
    the leader on its timeline within `max_lag_bytes`. Fails fast when its basebackup keeps failing."""
    if params.dry_run:
        return DRY_RUN_WAIT
    c = PatroniCluster.of(ctx, params)
    mark = recorded(ctx, MARK, "reinitialize")
    what = f"waiting for {params.pod} to be re-cloned and stream from the leader"
    return await wait_back(c, RECLONE, params.pod, mark, timeout_s=params.reinit_timeout_s, what=what)


STEPS: list[Step[ReinitParams]] = [
    Step("check-member", check_member, timeout_s=60, max_attempts=5),
    Step("reinitialize", reinitialize, timeout_s=pg.MAX_WAIT_S + 120, max_attempts=5),
    Step("wait-streaming", wait_streaming, timeout_s=pg.MAX_WAIT_S + 120, max_attempts=3),
]

JOB = pg_job_type(
    "pg-reinit",
    (
        "Re-clone one replica (`pod`) of a Patroni cluster in place through Patroni's REST API (POST "
        "/reinitialize): its pod and volume stay, its data directory is copied afresh from the leader; then wait "
        "until it streams within the lag limit. Refuses the leader and a member already re-cloning; fails fast on "
        "a basebackup that keeps failing; `dry_run` only runs the checks."
    ),
    ReinitParams,
    STEPS,
    PgSettings,
)
