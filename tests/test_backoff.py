"""The one retry mechanism (`service.backoff`) on a fake clock: its delays, cap, jitter, attempt limit and deadlines.
Nothing here sleeps; the retry loops that use it are tested through their behaviour elsewhere."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from service.backoff import Backoff


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_delays_grow_by_the_factor_up_to_the_cap() -> None:
    policy = Backoff(initial_s=0.1, cap_s=2.0)
    assert [policy.delay(n) for n in range(1, 8)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert [Backoff(initial_s=2.0, cap_s=16.0, factor=3.0).delay(n) for n in (1, 2, 3)] == [2.0, 6.0, 16.0]
    assert Backoff(initial_s=0.5, factor=1.0).delay(1000) == 0.5  # a fixed delay
    assert Backoff(initial_s=15.0, cap_s=10.0).delay(1) == 10.0  # a start beyond the cap is capped too


def test_a_loop_that_fails_for_ever_stays_at_the_cap() -> None:
    assert Backoff(initial_s=0.2, cap_s=5.0, factor=10.0).delay(100_000) == 5.0


def test_jitter_takes_off_at_most_its_share_of_the_wait() -> None:
    policy = Backoff(initial_s=0.5, cap_s=30.0, jitter=0.5)
    assert policy.delay(1, rand=lambda: 0.0) == 0.5
    assert policy.delay(1, rand=lambda: 0.999999) == pytest.approx(0.25, abs=1e-6)
    assert policy.delay(10, rand=lambda: 0.5) == 22.5  # from the capped wait
    rng = random.Random(7)
    samples = [policy.delay(3, rand=rng.random) for _ in range(200)]
    assert all(1.0 < s <= 2.0 for s in samples)
    delays = Backoff(initial_s=0.5, cap_s=30.0, jitter=0.5).retries(clock=FakeClock(), rand=random.Random(1).random)
    assert len({delays.failed() for _ in range(5)}) == 5  # random, not the same fraction every time


def test_max_attempts_count_the_failures_in_a_row() -> None:
    retries = Backoff(initial_s=0.2, max_attempts=3).retries(clock=FakeClock())
    assert [(retries.failed(), retries.exhausted) for _ in range(2)] == [(0.2, False), (0.4, False)]
    retries.succeeded()
    assert [(retries.failed(), retries.exhausted) for _ in range(3)] == [(0.2, False), (0.4, False), (0.8, True)]
    assert retries.failures == 3
    once = Backoff(initial_s=0.2, max_attempts=3).retries(max_attempts=1, clock=FakeClock())
    once.failed()
    assert once.exhausted


def test_no_wait_that_ends_at_or_after_the_deadline() -> None:
    clock = FakeClock()
    retries = Backoff(initial_s=1.0, factor=1.0).retries(deadline=clock.now + 3.0, clock=clock)
    assert retries.failed() == 1.0 and not retries.exhausted
    clock.now += 1.9
    retries.failed()
    assert not retries.exhausted  # tried again at 102.9, before 103
    clock.now += 0.1
    retries.failed()
    assert retries.exhausted  # a wait ending at the deadline is not worth it
    retries.succeeded(deadline=clock.now + 10.0)  # a renewal moves the deadline on
    retries.failed()
    assert not retries.exhausted


def test_give_up_after_failing_for_so_long_from_the_first_failure_in_a_row() -> None:
    clock = FakeClock()
    retries = Backoff(initial_s=1.0, factor=1.0, give_up_after_s=10.0).retries(clock=clock)
    clock.now += 50.0  # a long success before the first failure does not count
    retries.failed()
    clock.now += 8.5
    retries.failed()
    assert not retries.exhausted
    clock.now += 0.5
    retries.failed()
    assert retries.exhausted
    retries.succeeded()
    retries.failed()
    assert not retries.exhausted


def test_a_wait_the_server_asks_for_is_taken_as_asked_or_not_at_all() -> None:
    retries = Backoff(initial_s=0.0, cap_s=10.0, max_attempts=3).retries(clock=FakeClock())
    assert retries.failed(asked_s=7.5) == 7.5 and not retries.exhausted
    assert retries.failed(asked_s=10.5) == 10.5 and retries.exhausted
    bounded = Backoff(initial_s=0.0, cap_s=10.0).retries(deadline=105.0, clock=FakeClock())
    bounded.failed(asked_s=5.0)
    assert bounded.exhausted


async def test_deadlines_are_on_the_event_loops_clock() -> None:
    loop = asyncio.get_running_loop()
    retries = Backoff(initial_s=1.0).retries(deadline=loop.time() + 1.5)
    retries.failed()
    assert not retries.exhausted
    retries.failed()
    assert retries.exhausted


@pytest.mark.parametrize(
    "bad",
    [
        {"initial_s": -1.0},
        {"initial_s": 1.0, "cap_s": -1.0},
        {"initial_s": 1.0, "factor": 0.5},
        {"initial_s": 1.0, "jitter": 1.5},
    ],
)
def test_a_policy_that_is_not_a_backoff_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="not a backoff"):
        Backoff(**bad)
