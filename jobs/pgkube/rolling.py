"""A rolling restart's plan and progress as pg-restart keeps them in the job's state, whichever way the instances
are restarted (Patroni's POST /restart, or CloudNativePG's operator): the topology recorded once at the start, with
the replicas in the order they are restarted and the primary last (`topology`); the members done (`restarted`),
the one in progress and those remaining, in the words of the step details; and what it is asked with
(`RestartParams`)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from jobs.pgkube import params as pg
from jobs.pgkube.cluster import recorded
from jobs.pgkube.handover import HandoverParams
from service.jobtypes import StepContext


class RestartParams(HandoverParams):
    """What pg-restart is asked with, on either profile."""

    # CloudNativePG: its operator's rolling restart, asked through the Cluster resource (jobs.pg_restart_cnpg).
    cnpg_refusal: ClassVar[str | None] = None

    only_pending_restart: Annotated[
        bool, Field(description="restart only the members Patroni flags pending_restart; skip the others")
    ] = False
    method: Annotated[
        Literal["switchover", "in-place"],
        Field(description="for the primary: switch over to a healthy replica first, or restart it where it is"),
    ] = "switchover"
    restart_timeout_s: Annotated[
        pg.Seconds, Field(description="for each member: Patroni's restart and the member healthy again")
    ] = 300

    @model_validator(mode="after")
    def _cnpg_restarts_all(self) -> RestartParams:
        if self.profile == "cnpg" and self.only_pending_restart:
            raise ValueError(
                "profile cnpg: only_pending_restart needs Patroni's pending_restart flag, which CloudNativePG's "
                "Cluster does not report; its rolling restart restarts every instance"
            )
        return self


def topology(ctx: StepContext) -> dict[str, Any]:
    return recorded(ctx, "topology", "read-topology")


def done(ctx: StepContext) -> list[str]:
    return list(ctx.state.get("restarted") or [])


def planned(ctx: StepContext) -> list[str]:
    """Every member to restart, in order: the replicas, then the primary."""
    found = topology(ctx)
    return [*found["replicas"], *([found["primary"]] if found["primary"] else [])]


def order(found: dict[str, Any], method: str) -> str:
    """`pg-3, pg-2, pg-1 (the primary, after a switchover)`."""
    members = list(found["replicas"])
    if found["primary"]:
        how = "after a switchover" if method == "switchover" else "in place"
        members.append(f"{found['primary']} (the primary, {how})")
    return ", ".join(members) or "nothing"


def remaining(ctx: StepContext, current: str | None) -> list[str]:
    """The members planned, neither done nor `current`, in order."""
    finished = done(ctx)
    return [m for m in planned(ctx) if m not in finished and m != current]


def progress(ctx: StepContext, current: str | None) -> str:
    """`done: pg-1; in progress: pg-2; remaining: pg-0`, from the job's state."""
    finished, left = done(ctx), remaining(ctx, current)
    return (
        f"done: {', '.join(finished) or 'none'}; in progress: {current or 'none'}; "
        f"remaining: {', '.join(left) or 'none'}"
    )
