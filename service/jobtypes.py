"""What a job type is: a params model, a target, and ordered steps with their timeouts and retry policy.

A job type is declared in one module under `jobs/` and listed in `jobs/registry.py`, which the API app and the
worker import themselves. Both only ever see job types through a `Registry`, so adding one touches nothing here.
This module is the job author's SDK: it imports neither the API nor the worker runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel

from service.errors import NotFound
from service.settings import Settings

P = TypeVar("P", bound=BaseModel)
P_contra = TypeVar("P_contra", bound=BaseModel, contravariant=True)


class StepContext(Protocol):
    """What a step sees of its job. The worker's engine provides the implementation."""

    @property
    def job_id(self) -> str: ...

    @property
    def step(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    @property
    def resource(self) -> Any:
        """What the job type's `lifespan` yielded in this worker process (None without a lifespan)."""

    @property
    def state(self) -> Mapping[str, Any]:
        """What this job's steps remembered so far, on whichever worker they ran."""

    async def remember(self, **values: Any) -> None:
        """Keep `values` in the job's state (PostgreSQL), for later steps and for a run resumed elsewhere."""

    async def progress(self, detail: str) -> None:
        """Record what the step is doing or waiting for; shown in the step's `detail` at once."""


class StepFn(Protocol[P_contra]):
    async def __call__(self, ctx: StepContext, params: P_contra, /) -> str | None:
        """Do the step's work; return the step's final detail (or None to keep the last progress)."""


class TransientError(Exception):
    """An error worth retrying: the step runs again after a backoff, within its deadline and attempt limit."""


@dataclass(frozen=True)
class Step(Generic[P]):
    """One step: what it runs, how long it may take, and how often a transient error is retried."""

    name: str
    run: StepFn[P]
    timeout_s: float = 60.0
    max_attempts: int = 3
    retry_on: tuple[type[BaseException], ...] = (TransientError,)


@dataclass(frozen=True)
class JobType(Generic[P]):
    name: str
    description: str
    params: type[P]
    steps: Sequence[Step[P]]
    target: Callable[[P], str | None] = field(default=lambda params: None)
    # For types whose step list depends on the params (noop); by default every step runs.
    plan: Callable[[P], Sequence[Step[P]]] | None = None
    # Entered once per worker process at start-up, exited at shutdown; what it yields (a client, a pool) is
    # `ctx.resource` in every step of this type.
    lifespan: Callable[[Settings], AbstractAsyncContextManager[Any]] | None = None

    def steps_for(self, params: P) -> Sequence[Step[P]]:
        return self.plan(params) if self.plan is not None else self.steps

    def step(self, name: str) -> Step[P]:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(f"job type {self.name!r} has no step {name!r}")


class UnknownJobType(NotFound):
    code = "unknown_job_type"


class Registry:
    """The job types a process knows, by name."""

    def __init__(self, job_types: Iterable[JobType[Any]]) -> None:
        self._types: dict[str, JobType[Any]] = {}
        for job_type in job_types:
            if job_type.name in self._types:
                raise ValueError(f"job type {job_type.name!r} registered twice")
            self._types[job_type.name] = job_type

    def get(self, name: str) -> JobType[Any]:
        try:
            return self._types[name]
        except KeyError:
            known = ", ".join(sorted(self._types))
            raise UnknownJobType(f"unknown job type {name!r}; known types: {known}") from None

    def __iter__(self) -> Iterator[JobType[Any]]:
        return iter(self._types.values())
