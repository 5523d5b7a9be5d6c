"""Running a pg-* job type's steps by hand, without the engine: each step twice, as after a crash."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jobs.pg_rebuild import PgRebuildSettings
from jobs.pgkube.kube import lifespan
from service.jobtypes import Step
from tests.test_pg_rebuild_faults import FakeContext


async def run_each_step_twice(
    steps: Sequence[Step[Any]], kube_settings: PgRebuildSettings, params: Any, state: dict[str, Any]
) -> dict[str, tuple[str | None, str | None]]:
    """Each step run twice in a row, the second time with another context, as on another worker after a crash (only
    the job's `state` is shared); what each run said, by step."""
    runs: dict[str, tuple[str | None, str | None]] = {}
    async with lifespan(kube_settings) as clients:
        for step in steps:
            first = await step.run(FakeContext(clients, kube_settings, state), params)
            again = await step.run(FakeContext(clients, kube_settings, state, f"resumed-{step.name}"), params)
            runs[step.name] = (first, again)
    return runs
