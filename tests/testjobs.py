"""Job types that exist only in tests: a flaky step (transient errors), a step that outlives its deadline, a per-process
resource, a step that fails on demand, state across steps, and settings of a job type's own."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.jobtypes import JobType, Step, StepContext, TransientError, settings_from
from service.settings import EnvSettings

# Tries per job id; the in-process worker shares this module with the test.
TRIES: Counter[str] = Counter()


# The test types forbid unknown params, as docs/job-development.md asks of every type: the OpenAPI document then says
# so (`additionalProperties: false`), and a schema-valid body is one the API accepts.
class FlakyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fail_times: int = 2


async def flaky_step(ctx: StepContext, params: FlakyParams) -> str:
    TRIES[ctx.job_id] += 1
    if TRIES[ctx.job_id] <= params.fail_times:
        raise TransientError(f"upstream busy (try {TRIES[ctx.job_id]})")
    return f"worked on try {TRIES[ctx.job_id]}"


class SlowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class GreeterSettings(EnvSettings):
    """`APIOPS_GREETER_*`: the `greeter` job type's own settings."""

    greeter_greeting: str = "hello"
    greeter_voice: str = "a plain voice"
    greeter_max_names: Annotated[int, Field(ge=1)] = 3


class GreetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    names: list[str]
    greeting: Annotated[str | None, Field(validate_default=True)] = None

    @field_validator("names")
    @classmethod
    def _not_too_many(cls, value: list[str], info: ValidationInfo) -> list[str]:
        limit = settings_from(info, GreeterSettings).greeter_max_names
        if len(value) > limit:
            raise ValueError(f"at most {limit} names (APIOPS_GREETER_MAX_NAMES)")
        return value

    @field_validator("greeting")
    @classmethod
    def _default_greeting(cls, value: str | None, info: ValidationInfo) -> str:
        return value or settings_from(info, GreeterSettings).greeter_greeting


@asynccontextmanager
async def voice(settings: GreeterSettings) -> AsyncIterator[str]:
    yield settings.greeter_voice


async def greet(ctx: StepContext, params: GreetParams) -> str:
    settings: GreeterSettings = ctx.settings
    names = ", ".join(params.names)
    return f"{params.greeting} {names}, in {ctx.resource}; configured greeting {settings.greeter_greeting}"


# Not in JOB_TYPES (every operation of the test app costs the schemathesis run time): its tests make a registry.
GREETER = JobType[GreetParams](
    name="greeter",
    description="greets, as its settings say: its params' defaults and limits, its lifespan and its step",
    params=GreetParams,
    steps=[Step("greet", greet)],
    lifespan=voice,
    settings=GreeterSettings,
)

JOB_TYPES: list[JobType[Any]] = [FLAKY, SLOW, RESOURCEFUL, FRAGILE, MEMO]
