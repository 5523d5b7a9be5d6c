"""What a job type is: a params model, a target, ordered steps with their timeouts and retry policy, and its own
settings.

A job type is declared in one module under `jobs/` and listed in `jobs/registry.py`, which the API app and the
worker import themselves. Both only ever see job types through a `Registry`, so adding one touches nothing here.
A configurable job type declares a settings model of its own (`APIOPS_*` variables, see `service.settings.
EnvSettings`); the registry reads it from the environment once, or holds the instance a test or embedder supplies.
This module is the job author's SDK: it imports neither the API nor the worker runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError, ValidationInfo
from pydantic_settings import BaseSettings

from service.errors import NotFound
from service.settings import INVALID_SETTINGS, describe_invalid

logger = logging.getLogger(__name__)

P = TypeVar("P", bound=BaseModel)
P_contra = TypeVar("P_contra", bound=BaseModel, contravariant=True)
S = TypeVar("S", bound=BaseSettings)

# The key under which the API and the engine pass a job type's settings to its params' validators.
_SETTINGS = "settings"


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
    def settings(self) -> Any:
        """The job type's settings, an instance of its `JobType.settings` model (None without one)."""

    @property
    def state(self) -> Mapping[str, Any]:
        """What this job's steps remembered so far, on whichever worker they ran."""

    async def remember(self, **values: Any) -> None:
        """Keep `values` in the job's state (PostgreSQL), for later steps and for a run resumed elsewhere. The state
        is shown with the job (`state` in the API, on the console's job page): what the job found and decided, never
        a secret."""

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
    # What a job acts on, from its validated params (None: nothing shared). At most one job per target is active.
    target: Callable[[P], str | None] = field(default=lambda params: None)
    # The namespace the target lives in (`<target_kind>/<target>`): a job type can only ever name targets of its own
    # kind, so free-form params of one type cannot claim, and so block, what another acts on. Job types that act on
    # the same things share a kind (every PostgreSQL-on-Kubernetes job: `k8s`). By default, the type's own name.
    target_kind: str | None = None
    # Which submissions change nothing in the world (a dry run): those never wait for an approval.
    changes_nothing: Callable[[P], bool] = field(default=lambda params: False)
    # For types whose step list depends on the params (noop); by default every step runs.
    plan: Callable[[P], Sequence[Step[P]]] | None = None
    # Entered once per worker process at start-up with the job type's settings (None without a model), exited at
    # shutdown; what it yields (a client, a pool) is `ctx.resource` in every step of this type.
    lifespan: Callable[[Any], AbstractAsyncContextManager[Any]] | None = None
    # A pydantic-settings model (usually derived from `service.settings.EnvSettings`): `ctx.settings` in the steps,
    # the lifespan's argument, and `settings_from(info, Model)` in the params' validators.
    settings: type[BaseSettings] | None = None

    def target_of(self, params: P) -> str | None:
        """The job's target as recorded and excluded on: `target(params)` inside this type's namespace."""
        named = self.target(params)
        return None if named is None else f"{self.target_kind or self.name}/{named}"

    def steps_for(self, params: P) -> Sequence[Step[P]]:
        return self.plan(params) if self.plan is not None else self.steps

    def step(self, name: str) -> Step[P]:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(f"job type {self.name!r} has no step {name!r}")


def settings_from(info: ValidationInfo, model: type[S]) -> S:
    """In a params validator: the job type's settings, which the API and the engine pass in the validation context
    (`Registry.params_context`). Validating such params without them is a programming error, not bad input."""
    given = info.context.get(_SETTINGS) if isinstance(info.context, dict) else None
    if not isinstance(given, model):
        raise TypeError(f"these params are validated with {model.__name__} in context={{{_SETTINGS!r}: ...}}")
    return given


class UnknownJobType(NotFound):
    code = "unknown_job_type"


class Registry:
    """The job types a process knows, by name, and their settings.

    A job type's settings are read from the environment the first time they are needed (the API app and the worker
    ask at start-up, so a bad variable stops them there), once per registry: once per process for `jobs.registry`'s.
    Tests and embedders supply instances instead, by job type name: `Registry([...], settings={...})` or
    `registry.with_settings({...})`.
    """

    def __init__(self, job_types: Iterable[JobType[Any]], settings: Mapping[str, BaseSettings] | None = None) -> None:
        self._types: dict[str, JobType[Any]] = {}
        for job_type in job_types:
            if job_type.name in self._types:
                raise ValueError(f"job type {job_type.name!r} registered twice")
            self._types[job_type.name] = job_type
        self._settings: dict[str, BaseSettings] = {}
        for name, given in (settings or {}).items():
            model = self.get(name).settings
            if model is None or not isinstance(given, model):
                expected = model.__name__ if model is not None else "None: it declares no settings"
                raise TypeError(f"settings of job type {name!r} must be {expected}, not {type(given).__name__}")
            self._settings[name] = given

    def with_settings(self, settings: Mapping[str, BaseSettings]) -> Registry:
        """The same job types, with these settings (by job type name) in place of the environment's."""
        return Registry(self, {**self._settings, **settings})

    def settings(self, name: str) -> BaseSettings | None:
        """Job type `name`'s settings: as supplied, else read from the environment; None if it declares none."""
        model = self.get(name).settings
        if model is None:
            return None
        if name not in self._settings:
            self._settings[name] = model()
        return self._settings[name]

    def invalid_settings(self) -> list[str]:
        """Read every job type's settings now; one line per invalid variable (`describe_invalid`'s, after the names
        of the job types that read it: several share `APIOPS_KUBE_*`), none when all are valid."""
        problems: dict[str, list[str]] = {}  # a variable's line -> the job types that read it
        for job_type in self:
            try:
                self.settings(job_type.name)
            except ValidationError as exc:
                assert job_type.settings is not None
                for line in describe_invalid(exc, job_type.settings):
                    problems.setdefault(line, []).append(job_type.name)
        return [
            f"job type{'s' if len(names) > 1 else ''} {', '.join(names)}: {line}" for line, names in problems.items()
        ]

    def load_settings_or_exit(self) -> None:
        """At a process's start (the API's, a worker's): every job type's settings, or each invalid one logged in one
        line naming its variable, and exit 2 as on a usage error: an operator reads what to fix, not a traceback."""
        problems = self.invalid_settings()
        for problem in problems:
            logger.error("invalid setting of %s", problem)
        if problems:
            raise SystemExit(INVALID_SETTINGS)

    def params_context(self, name: str) -> dict[str, Any]:
        """The validation context of job type `name`'s params: `model_validate(raw, context=...)`."""
        return {_SETTINGS: self.settings(name)}

    def get(self, name: str) -> JobType[Any]:
        try:
            return self._types[name]
        except KeyError:
            known = ", ".join(sorted(self._types))
            raise UnknownJobType(f"unknown job type {name!r}; known types: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[JobType[Any]]:
        return iter(self._types.values())
