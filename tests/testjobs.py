"""Job types that exist only in tests: a flaky step (transient errors), a step that outlives its deadline, a per-process
resource, a step that fails on demand, state across steps, settings of a job type's own, a step that records every
moment it runs, and a step that blocks its worker's event loop."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
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


class RecordParams(BaseModel):
    path: str
    seconds: float = 6.0
    # How long attempt 1 runs, when it should outlast whatever a test does to its worker meanwhile.
    first_attempt_s: float | None = None


def _tick(path: Path, attempt: int) -> None:
    with path.open("a", encoding="utf-8") as ticks:
        ticks.write(f"{attempt} {time.monotonic():.3f}\n")


async def record(ctx: StepContext, params: RecordParams) -> str:
    """Appends `<attempt> <monotonic time>` to the file `path` every 100 ms for as long as it runs (a file: it does
    not depend on the worker's network), and reports progress every second, for `seconds` in all."""
    path = Path(params.path)

    async def ticks() -> None:
        while True:
            _tick(path, ctx.attempt)
            await asyncio.sleep(0.1)

    loop = asyncio.get_running_loop()
    seconds = params.first_attempt_s if ctx.attempt == 1 and params.first_attempt_s is not None else params.seconds
    end = loop.time() + seconds
    async with asyncio.TaskGroup() as group:
        ticker = group.create_task(ticks())
        said = 0
        while (left := end - loop.time()) > 0:
            said += 1
            await ctx.progress(f"tick {said}")
            await asyncio.sleep(min(1.0, left))
        ticker.cancel()
    return f"recorded for {seconds:g}s"


# Module level, so that a worker process (tests/kit_worker.py) can import it; its tests make a registry.
RECORDER = JobType[RecordParams](
    name="recorder",
    description="records every moment its step runs, in a file",
    params=RecordParams,
    steps=[Step("record", record, timeout_s=120)],
)


class BlockParams(BaseModel):
    block_s: float
    times: int = 1


async def block(ctx: StepContext, params: BlockParams) -> str:
    """Blocks its worker's event loop (a synchronous sleep) `times` times, yielding for 50 ms in between: what a
    careless step does."""
    for n in range(params.times):
        if n:
            await asyncio.sleep(0.05)
        time.sleep(params.block_s)  # noqa: ASYNC251  # the point: a step that blocks the loop
    return f"blocked the loop {params.times} times for {params.block_s:g}s"


BLOCKER = JobType[BlockParams](
    name="blocker",
    description="blocks its worker's event loop for block_s",
    params=BlockParams,
    steps=[Step("block", block, timeout_s=60)],
)

JOB_TYPES: list[JobType[Any]] = [FLAKY, SLOW, RESOURCEFUL, FRAGILE, MEMO]
