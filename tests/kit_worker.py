"""A worker process for the job author's kit (tests/kit.py): `python -m tests.kit_worker CONFIG`.

It runs the real worker, `jobs.worker.WorkerSettings` as `arq jobs.worker.WorkerSettings` runs it, with the
settings and job types a test wrote to CONFIG instead of the environment's and `jobs.registry`'s. A process of its
own, so that the test can SIGKILL it in the middle of a step: a death that the engine cannot clean up after.
"""

from __future__ import annotations

import importlib
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arq.worker import run_worker
from pydantic_settings import BaseSettings

from jobs.worker import WorkerSettings
from service.jobtypes import JobType, Registry
from service.queue import redis_settings
from service.settings import Settings

# As the in-process test workers poll (tests/conftest.py: running_worker).
POLL_DELAY_S = 0.01


@dataclass(frozen=True)
class WorkerConfig:
    settings: Settings
    # "module:NAME" of each job type: a job type holds functions, which only travel to another process by name.
    job_types: tuple[str, ...]
    # Each job type's own settings, as the test's registry has them.
    job_settings: dict[str, BaseSettings]


def reference(job_type: JobType[Any]) -> str:
    """Where a job type can be imported from: the module-level name it has in the module of its first step."""
    module = sys.modules[job_type.steps[0].run.__module__]
    for name, value in vars(module).items():
        if value is job_type:
            return f"{module.__name__}:{name}"
    raise ValueError(f"job type {job_type.name!r} is not a module-level name of {module.__name__}")


def write(path: Path, settings: Settings, registry: Registry) -> Path:
    job_settings = {t.name: found for t in registry if (found := registry.settings(t.name)) is not None}
    path.write_bytes(pickle.dumps(WorkerConfig(settings, tuple(reference(t) for t in registry), job_settings)))
    return path


def _load(ref: str) -> JobType[Any]:
    module, _, name = ref.partition(":")
    job_type: JobType[Any] = getattr(importlib.import_module(module), name)
    return job_type


def main(path: str) -> None:
    config: WorkerConfig = pickle.loads(Path(path).read_bytes())
    settings = config.settings
    run_worker(
        dict(vars(WorkerSettings)),  # as arq reads the class: its own __dict__
        redis_settings=redis_settings(settings),
        queue_name=settings.queue_name,
        poll_delay=POLL_DELAY_S,
        ctx={
            "settings": settings,
            "registry": Registry((_load(ref) for ref in config.job_types), config.job_settings),
        },
    )


if __name__ == "__main__":
    main(sys.argv[1])
