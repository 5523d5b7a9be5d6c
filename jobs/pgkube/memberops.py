"""Restarting or re-cloning one member through Patroni: asked once, crash-safe, then waited for until the member is
back and healthy, failing fast when it will not come back. pg-restart and pg-reinit are made of it.

    mark = await ask_once(c, RESTART, "pg-1", send, key="restarting", timeout_s=300)
    detail = await wait_back(c, RESTART, "pg-1", mark, timeout_s=300)

Asked once: before the request is sent, the job records in its state (under `key`) the member, its PostgreSQL's
start time (`postmaster_start_time` of Patroni's GET /patroni) and that a request is on its way. A step run again,
on whichever worker, recognises the action already done or under way (a new start time, or Patroni showing the member
`restarting`, `creating replica`, ...) and sends nothing; a request sent by a worker that was lost is waited for,
and sent again only if nothing happened within the timeout. Back: PostgreSQL started again since (a new start time),
and the member streams from the leader on its timeline within the lag limit (or, for a leader restarted in place,
runs as the leader). Fails fast: Patroni's states that mean "it did not work" (a crash loop after a restart, a
basebackup begun again and again) counted over the wait fail it once they repeat.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from jobs.pgkube.cluster import PatroniCluster, not_streaming
from jobs.pgkube.patroni import MemberStatus, PatroniRefused, PatroniUnavailable
from jobs.pgkube.waiting import Seen, WaitTimeout, WontHeal


@dataclass(frozen=True)
class Action:
    """What Patroni does to a member, as the job sees it in Patroni's states."""

    name: str  # in the job's words: "restart", "re-clone"
    executor: str  # Patroni's name for it in "<action> already in progress"
    busy: frozenset[str]  # states that show it under way (PostgreSQL down because of it)
    failing: frozenset[str]  # states whose entries, counted over one wait, say it does not work
    limit: int  # that many entries fail the wait
    # The failure, with {member}, {entries} and {state}.
    failure: str


# A restart that fails leaves PostgreSQL down: Patroni answers "restart failed", then tries to start it on every
# cycle (`starting`, `crashed`, `start failed`), never giving up (patroni/ha.py: `Ha.restart`, `post_recover`).
RESTART = Action(
    name="restart",
    executor="restart",
    busy=frozenset({"restarting", "stopping", "stopped", "starting", "restart failed", "start failed", "crashed"}),
    failing=frozenset({"restart failed", "start failed", "crashed"}),
    limit=3,
    failure="{member} crash-loops after its restart: PostgreSQL failed to start {entries} times (now {state})",
)
# A re-clone whose basebackup fails ends `stopped` with an empty data directory, and Patroni bootstraps the member
# again on its next cycle: `creating replica` once more (patroni/postgresql/bootstrap.py: `create_replica`;
# patroni/ha.py: `clone`). The first entry is the re-clone asked for; each further one follows a failed basebackup.
RECLONE = Action(
    name="re-clone",
    executor="reinitialize",
    busy=frozenset({"creating replica", "stopped", "starting"}),
    failing=frozenset({"creating replica"}),
    limit=3,
    failure="{member}'s basebackup keeps failing: Patroni began {entries} basebackups, each after the last failed "
    "(now {state})",
)


class Churn:
    """Counts a member's entries into the failing states of an action, across the polls of one wait."""

    def __init__(self, action: Action) -> None:
        self.action = action
        self.last: str | None = None
        self.entries = 0

    def see(self, member: str, state: str) -> None:
        failing = self.action.failing
        if state in failing and self.last not in failing:
            self.entries += 1
        self.last = state
        if self.entries >= self.action.limit:
            raise WontHeal(self.action.failure.format(member=member, entries=self.entries, state=state))


def happened(action: Action, status: MemberStatus, mark: dict[str, Any]) -> bool:
    """Whether the action marked has begun or is done: PostgreSQL started again since, or is down because of it (in
    a state of the action other than the one it was in before: a `stopped` replica re-cloned is `stopped` no more)."""
    started_again = status.started is not None and status.started != mark["before"]
    return started_again or (status.state in action.busy and status.state != mark["state"])


async def ask_once(
    c: PatroniCluster,
    action: Action,
    pod: str,
    send: Callable[[], Awaitable[str]],
    *,
    key: str,
    timeout_s: float,
) -> tuple[dict[str, Any], str]:
    """Asks Patroni (through `send`) to act on `pod`, unless this job already did and it happened: the mark kept
    under `key` and what was done, in words for the detail. `send` says what Patroni's answers mean to the job; a
    refusal or a 503 it lets through means Patroni did nothing (the mark is cleared, the error raised), except
    "<action> already in progress", which is this job's own request at work."""
    recorded: dict[str, Any] | None = c.ctx.state.get(key)
    mark = recorded if recorded is not None and recorded["member"] == pod else None
    if mark is None:
        status = await c.patroni.status(pod)
        mark = {"member": pod, "before": status.started, "state": status.state, "sent": False}
        await c.ctx.remember(**{key: mark})
    if mark["sent"]:  # a request may have reached Patroni (a worker was lost before the answer): look first
        asked = mark

        async def probe() -> Seen[MemberStatus]:
            now = await c.patroni.status(pod)
            return Seen("", now) if happened(action, now, asked) else Seen(f"{pod} {now.state}, unchanged")

        what = f"waiting for the {action.name} of {pod} asked earlier in this job"
        try:
            status = await c.wait(probe, what, timeout_s)
            return mark, f"the {action.name} of {pod} was asked earlier in this job ({status.state}), nothing sent"
        except WaitTimeout:  # it never reached Patroni: ask again
            pass
    mark = mark | {"sent": True}
    await c.ctx.remember(**{key: mark})
    try:
        return mark, f"Patroni: {await send()}"
    except PatroniUnavailable as exc:
        if exc.answer == f"{action.executor} already in progress":
            return mark, f"Patroni: {exc.answer}"
        await c.ctx.remember(**{key: mark | {"sent": False}})
        raise
    except PatroniRefused:
        await c.ctx.remember(**{key: mark | {"sent": False}})
        raise


async def wait_back(
    c: PatroniCluster,
    action: Action,
    pod: str,
    mark: dict[str, Any],
    *,
    timeout_s: float,
    what: str,
    churn: Churn | None = None,
) -> str:
    """Waits until `pod`'s PostgreSQL has started again since `mark` and the member is healthy: a replica streaming
    from the leader on its timeline within the lag limit, or the leader running. Fails fast when the action keeps
    failing (`churn`, which may already count what the request's answer said)."""
    churn = churn or Churn(action)
    max_lag = c.params.max_lag_bytes

    async def probe() -> Seen[str]:
        view = await c.view()
        member = view.member(pod)
        if member is None:
            return Seen(f"{pod} (not in Patroni's member list)")
        churn.see(pod, member.state)
        status = await c.patroni.status(pod)
        if status.started is None or status.started == mark["before"]:
            return Seen(f"{member.describe()}, not started again yet")
        leaders = view.leaders
        if member.leads:
            if member.state == "running" and len(leaders) == 1:
                return Seen("", f"{member.describe()} leads, started again at {status.started}")
            return Seen(f"{member.describe()}, leading, not running yet")
        if len(leaders) != 1:
            return Seen(f"{member.describe()}; leaders: {', '.join(m.name for m in leaders) or 'none'}")
        reason = not_streaming(member, leaders[0], max_lag)
        if reason is not None:
            return Seen(reason)
        return Seen("", f"{member.describe()} streams from {leaders[0].name}, started again at {status.started}")

    return await c.wait(probe, what, timeout_s)
