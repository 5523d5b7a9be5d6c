"""Cooperative waits: poll the world until a condition holds, say what is awaited, fail fast on what will not heal.

    pod = await wait_until(ctx, probe, what="waiting for pods", timeout_s=600, interval_s=2)

`probe` reads the world once and returns `Seen(text)` (shown as `waiting for pods, remaining: pg-1 (Pending:
ContainerCreating)`, written only when it changes) or `Seen(text, result)` when the wait is over. It raises
`WontHeal` for a condition that waiting will not fix, which fails the step at once. An API error worth retrying
does not end the wait: it is shown and the probe runs again after a backoff, the wait's deadline still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from jobs.pgkube.kube import PodView
from service.backoff import Backoff
from service.jobtypes import StepContext, TransientError

T = TypeVar("T")

# Container waiting reasons that a replica does not recover from by itself.
FATAL_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
# Restarts seen during one wait before "the restart count is climbing" is a failure of its own.
MAX_RESTARTS_WHILE_WAITING = 3
# API errors in a row are retried from the poll interval on (`initial_s` at least), up to `max_attempts`.
API_ERROR_RETRIES = Backoff(initial_s=0.2, cap_s=10.0, max_attempts=8)


class WontHeal(Exception):
    """A condition that will not heal by waiting (CrashLoopBackOff, Unschedulable for too long, ...)."""


class WaitTimeout(Exception):
    """The wait's own deadline passed; the message says what it waited for and what it saw last."""


@dataclass(frozen=True)
class Seen(Generic[T]):
    text: str
    result: T | None = None


async def wait_until(
    ctx: StepContext,
    probe: Callable[[], Awaitable[Seen[T]]],
    *,
    what: str,
    timeout_s: float,
    interval_s: float,
) -> T:
    last = "nothing yet"
    retries = replace(API_ERROR_RETRIES, initial_s=max(interval_s, API_ERROR_RETRIES.initial_s)).retries()
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            while True:
                try:
                    seen = await probe()
                except TransientError as exc:
                    delay = retries.failed()
                    if retries.exhausted:
                        raise
                    await ctx.progress(f"{what}; API error ({exc}), retrying; last seen: {last}")
                    await asyncio.sleep(delay)
                    continue
                retries.succeeded()
                if seen.result is not None:
                    return seen.result
                last = seen.text
                await ctx.progress(f"{what}, {seen.text}")
                await asyncio.sleep(interval_s)
    except TimeoutError:
        if deadline.expired():
            raise WaitTimeout(f"{what}: not done within {timeout_s:g}s; last seen: {last}") from None
        raise


class Since:
    """How long each named condition has held without a break, as seen by one wait."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def held(self, key: str, holds: bool) -> float:
        now = asyncio.get_running_loop().time()
        if not holds:
            self._since.pop(key, None)
            return 0.0
        return now - self._since.setdefault(key, now)


class PodWatch:
    """Fail-fast checks on one pod across polls: fatal container states, climbing restarts, Unschedulable."""

    def __init__(self, unschedulable_grace_s: float) -> None:
        self.unschedulable_grace_s = unschedulable_grace_s
        self.since = Since()
        self._restarts_at_start: dict[str, int] = {}

    def check(self, pod: PodView) -> None:
        for c in pod.containers:
            if c.waiting_reason in FATAL_WAITING_REASONS:
                last = f"; last terminated: {c.last_terminated}" if c.last_terminated else ""
                raise WontHeal(
                    f"pod {pod.name} container {c.name}: {c.waiting_reason}: {c.waiting_message or 'no message'} "
                    f"(restarts: {c.restarts}{last})"
                )
        baseline = self._restarts_at_start.setdefault(pod.uid, pod.restarts)
        if pod.restarts - baseline >= MAX_RESTARTS_WHILE_WAITING:
            raise WontHeal(f"pod {pod.name} restarted {pod.restarts - baseline} times while waiting for it")
        scheduled = pod.conditions.get("PodScheduled")
        stuck = scheduled is not None and scheduled.status == "False" and scheduled.reason == "Unschedulable"
        held = self.since.held(f"unschedulable/{pod.uid}", stuck)
        if stuck and scheduled is not None:
            message = scheduled.message or ""
            # A pod whose claim does not exist stays Pending for ever: the StatefulSet only creates missing
            # claims before it creates the pod.
            grace = min(self.unschedulable_grace_s, 5.0) if "not found" in message else self.unschedulable_grace_s
            if held >= grace:
                raise WontHeal(f"pod {pod.name} Unschedulable for {held:.0f}s: {message or 'no message'}")


def describe_pod(pod: PodView, extra: str | None = None) -> str:
    """`pg-1 (Pending: ContainerCreating)`, `pg-1 (Running, not Ready)`, `pg-1 (Terminating)`."""
    if pod.deleting:
        return f"{pod.name} (Terminating)"
    reasons = [c.waiting_reason for c in pod.containers if c.waiting_reason]
    scheduled = pod.conditions.get("PodScheduled")
    if scheduled is not None and scheduled.status == "False":
        reasons.insert(0, f"{scheduled.reason or 'NotScheduled'}: {scheduled.message or ''}".rstrip(": "))
    state = f"{pod.phase}: {', '.join(reasons)}" if reasons else pod.phase
    if pod.phase == "Running" and not reasons:
        state = "Running, Ready" if pod.ready else "Running, not Ready"
    return f"{pod.name} ({state}{', ' + extra if extra else ''})"
