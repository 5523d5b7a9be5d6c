"""Job types that exist only in tests: a flaky step (transient errors) and a step that outlives its deadline."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from pydantic import BaseModel

from service.jobtypes import JobType, Step, StepContext, TransientError

# Tries per job id; the in-process worker shares this module with the test.
TRIES: Counter[str] = Counter()


class FlakyParams(BaseModel):
    fail_times: int = 2


async def flaky_step(ctx: StepContext, params: FlakyParams) -> str:
    TRIES[ctx.job_id] += 1
    if TRIES[ctx.job_id] <= params.fail_times:
        raise TransientError(f"upstream busy (try {TRIES[ctx.job_id]})")
    return f"worked on try {TRIES[ctx.job_id]}"


class SlowParams(BaseModel):
    pass


async def slow_step(ctx: StepContext, params: SlowParams) -> str:
    await ctx.progress("waiting for the thing; seen: nothing yet")
    await asyncio.sleep(30)
    return "never"


FLAKY = JobType[FlakyParams](
    name="flaky",
    description="fails with a transient error `fail_times` times, then succeeds",
    params=FlakyParams,
    steps=[Step("flaky", flaky_step, timeout_s=10, max_attempts=4)],
)

SLOW = JobType[SlowParams](
    name="slow",
    description="waits longer than its step's deadline",
    params=SlowParams,
    steps=[Step("wait-for-thing", slow_step, timeout_s=0.3)],
)

JOB_TYPES: list[JobType[Any]] = [FLAKY, SLOW]
