"""Retry with backoff, the one way the project waits between tries of something that failed.

A `Backoff` is a policy, named once beside the code that uses it; `policy.retries()` follows one loop's failures
in a row under it:

    retries = RECONNECT.retries()
    while True:
        try:
            conn = await connect()
        except OSError as exc:
            delay = retries.failed()
            if retries.exhausted:
                raise
            logger.warning("cannot connect, retrying in %.1fs: %s", delay, exc)
            await asyncio.sleep(delay)
            continue
        retries.succeeded()

The n-th failure in a row waits `initial_s * factor**(n - 1)`, at most `cap_s`, less a random share of up to
`jitter` of it (so that clients that failed together do not all come back together). A loop is `exhausted` after
`max_attempts` failures in a row, after failing for `give_up_after_s` without a success, or when the wait would
end at or after its deadline: a try that could not finish in time is not worth waiting for. A wait the server
asks for (HTTP `Retry-After`) is taken as asked when it is within `cap_s`; a longer one is given up rather than
cut short. The caller logs, reports and sleeps: what it says differs from loop to loop.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """A retry policy: the wait after each failure in a row, and when to stop trying."""

    initial_s: float
    cap_s: float = math.inf
    factor: float = 2.0
    # The share of each wait that is random: 0.5 waits between half the computed wait and all of it.
    jitter: float = 0.0
    # Tries in all (the first one included) before the loop gives up; None: no limit.
    max_attempts: int | None = None
    # How long a loop may go on failing, from its first failure in a row; None: no limit.
    give_up_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.cap_s < 0 or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"not a backoff: {self}")

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """The wait after the `failures`-th failure in a row (1 for the first); `rand` returns a float in [0, 1)."""
        try:
            grown = self.initial_s * self.factor ** (failures - 1)
        except OverflowError:  # a loop that has failed for ever: long past the cap
            grown = math.inf
        return min(self.cap_s, grown) * (1 - self.jitter * rand())

    def retries(
        self,
        *,
        deadline: float | None = None,
        max_attempts: int | None = None,
        clock: Callable[[], float] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> Retries:
        """A loop's retries under this policy. `deadline` is a time on `clock` (the running event loop's clock,
        as `asyncio.timeout_at` uses, unless given); `max_attempts` overrides the policy's."""
        return Retries(self, deadline, self.max_attempts if max_attempts is None else max_attempts, clock, rand)


class Retries:
    """One loop's failures in a row under a `Backoff`: how long to wait before the next try, and when to stop."""

    def __init__(
        self,
        policy: Backoff,
        deadline: float | None,
        max_attempts: int | None,
        clock: Callable[[], float] | None,
        rand: Callable[[], float],
    ) -> None:
        self.policy = policy
        self.deadline = deadline
        self.max_attempts = max_attempts
        self._clock = clock or asyncio.get_running_loop().time
        self._rand = rand
        self.failures = 0
        self.exhausted = False
        self._failing_since: float | None = None

    def failed(self, asked_s: float | None = None) -> float:
        """Count one more failure in a row; returns the wait before the next try (`asked_s` when the server
        asked for one) and sets `exhausted` when there should be no next try."""
        now = self._clock()
        self.failures += 1
        if self._failing_since is None:
            self._failing_since = now
        delay = self.policy.delay(self.failures, self._rand) if asked_s is None else asked_s
        ends = [bound for bound in (self.deadline, self._give_up_at()) if bound is not None]
        self.exhausted = (
            (self.max_attempts is not None and self.failures >= self.max_attempts)
            or delay > self.policy.cap_s
            or any(now + delay >= end for end in ends)
        )
        return delay

    def succeeded(self, deadline: float | None = None) -> None:
        """A try worked: the next failure is the first in a row again. `deadline`, when given, replaces it."""
        self.failures = 0
        self.exhausted = False
        self._failing_since = None
        if deadline is not None:
            self.deadline = deadline

    def _give_up_at(self) -> float | None:
        if self.policy.give_up_after_s is None or self._failing_since is None:
            return None
        return self._failing_since + self.policy.give_up_after_s
