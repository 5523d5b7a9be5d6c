"""Job types that exist only in tests: a flaky step (transient errors), a step that outlives its deadline, a per-process
resource, a step that fails on demand, and state across steps."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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

# Per-process resource: opened once at worker start-up, closed at shutdown.
LIFESPAN_LOG: list[str] = []


@asynccontextmanager
async def shared_client(settings: None) -> AsyncIterator[dict[str, str]]:
    LIFESPAN_LOG.append("opened")
    try:
        yield {"name": "the shared client"}
    finally:
        LIFESPAN_LOG.append("closed")


async def use_resource(ctx: StepContext, params: SlowParams) -> str:
    return f"used {ctx.resource['name']}"


RESOURCEFUL = JobType[SlowParams](
    name="resourceful",
    description="uses a resource its lifespan opened once per worker",
    params=SlowParams,
    steps=[Step("use", use_resource), Step("use-again", use_resource)],
    lifespan=shared_client,
)

# Job ids whose `act` step fails; a test removes the id before retrying the job.
BROKEN: set[str] = set()


async def prepare(ctx: StepContext, params: SlowParams) -> str:
    return "prepared"


async def act(ctx: StepContext, params: SlowParams) -> str:
    if ctx.job_id in BROKEN:
        raise RuntimeError("the thing is broken")
    return "acted"


FRAGILE = JobType[SlowParams](
    name="fragile",
    description="prepare, act (fails while the job id is in BROKEN), verify",
    params=SlowParams,
    steps=[Step("prepare", prepare), Step("act", act), Step("verify", prepare)],
)


async def learn(ctx: StepContext, params: SlowParams) -> str:
    await ctx.remember(learned_by=f"attempt {ctx.attempt}")
    return "learned"


async def recall(ctx: StepContext, params: SlowParams) -> str:
    return f"recalled what {ctx.state.get('learned_by')} learned"


MEMO = JobType[SlowParams](
    name="memo",
    description="one step remembers, the next recalls",
    params=SlowParams,
    steps=[Step("learn", learn), Step("recall", recall)],
)


JOB_TYPES: list[JobType[Any]] = [FLAKY, SLOW, RESOURCEFUL, FRAGILE, MEMO]
