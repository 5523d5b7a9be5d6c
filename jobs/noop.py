"""`noop`: a job that does nothing, slowly if asked; for smoke tests, demos and benchmarks.

Params choose how many steps run (`step-1` .. `step-N`), how long each sleeps, and which one fails on purpose.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.jobtypes import JobType, Step, StepContext

MAX_STEPS = 20


class NoopParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: Annotated[int, Field(ge=1, le=MAX_STEPS, description="how many steps the job has")] = 2
    sleep_s: Annotated[float, Field(ge=0, le=600, description="seconds each step sleeps")] = 0
    fail_at_step: Annotated[int | None, Field(ge=1, le=MAX_STEPS, description="this step fails on purpose")] = None
    target: Annotated[
        str | None,
        Field(
            max_length=200,
            description="what the job claims, recorded as `noop/<target>`; one active job per target",
        ),
    ] = None

    @model_validator(mode="after")
    def _fail_within_steps(self) -> Self:
        if self.fail_at_step is not None and self.fail_at_step > self.steps:
            raise ValueError(f"fail_at_step ({self.fail_at_step}) is after the last step ({self.steps})")
        return self


class NoopFailure(Exception):
    """The failure a `fail_at_step` asks for."""


async def sleep_step(ctx: StepContext, params: NoopParams) -> str:
    """Sleeps `sleep_s`, changing nothing in the world; fails if this is the `fail_at_step` step."""
    number = int(ctx.step.removeprefix("step-"))
    if params.sleep_s:
        await ctx.progress(f"sleeping {params.sleep_s:g}s")
        await asyncio.sleep(params.sleep_s)
    if params.fail_at_step == number:
        raise NoopFailure(f"failed on purpose at step {number}")
    return f"slept {params.sleep_s:g}s"


STEPS = tuple(Step[NoopParams](f"step-{n}", sleep_step, timeout_s=660, max_attempts=1) for n in range(1, MAX_STEPS + 1))

JOB = JobType[NoopParams](
    name="noop",
    description="Does nothing: runs `steps` steps that each sleep `sleep_s` seconds; `fail_at_step` fails one.",
    params=NoopParams,
    steps=STEPS,
    target=lambda params: params.target,
    plan=lambda params: STEPS[: params.steps],
)
