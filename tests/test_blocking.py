"""A blocked event loop is seen and contained. A step that blocks its worker's loop (a synchronous sleep) stops every
lease renewal there: within the documented bound nothing happens; past it, its jobs are taken over, and a job whose
step keeps doing it is failed after APIOPS_MAX_TAKEOVERS_WITHOUT_PROGRESS takeovers instead of stalling worker after
worker, while the other jobs finish without running a finished step again."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import httpx
import pytest

from jobs.noop import JOB as NOOP
from jobs.runtime.engine import longest_safe_block_s
from service.jobtypes import Registry
from service.settings import Settings
from tests.conftest import api_client, free_port, headers, submit, wait_for_status
from tests.history import assert_no_step_ran_on_two_workers_at_once
from tests.processes import job_worker
from tests.testjobs import BLOCKER


@pytest.mark.timeout(60)
async def test_a_step_that_blocks_the_loop_within_the_bound_costs_no_lease(settings: Settings, tmp_path: Path) -> None:
    steady = settings.model_copy(update={"lease_ttl_s": 6.0, "reaper_interval_s": 0.25})
    bound = longest_safe_block_s(steady)  # 2.3 s
    registry = Registry([BLOCKER])
    async with api_client(steady, registry, headers=headers("writer")) as client:
        # Blocks of 80% of the bound, one after the other, for longer than the lease: at every phase of the renewals.
        job_id = await submit(client, "blocker", block_s=round(bound * 0.8, 2), times=4)
        metrics_port = free_port()  # the one worker, so that it runs the job
        async with job_worker(tmp_path, "a", steady.model_copy(update={"worker_metrics_port": metrics_port}), registry):
            job = await wait_for_status(client, job_id, "success", "failed", within=40)
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text

    assert job["status"] == "success" and job["attempt"] == 1, job
    blocked = next(line for line in metrics.splitlines() if line.startswith("apiops_worker_event_loop_blocked_total"))
    assert float(blocked.split()[-1]) >= 4, "each block was counted"
    log = (tmp_path / "a.log").read_text(encoding="utf-8")
    assert "step block blocked the event loop for" in log, "the block was said, naming the step"


@pytest.mark.timeout(90)
async def test_a_step_that_blocks_the_loop_fails_its_job_after_a_few_takeovers_while_the_others_finish(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> None:
    fast = settings.model_copy(update={"reaper_interval_s": 0.25, "max_takeovers_without_progress": 2})
    registry = Registry([BLOCKER, NOOP])
    async with api_client(fast, registry, headers=headers("writer")) as client:
        others = [await submit(client, "noop", steps=3, sleep_s=0.7) for _ in range(6)]
        blocker = await submit(client, "blocker", block_s=fast.lease_ttl_s * 2)
        async with job_worker(tmp_path, "a", fast, registry), job_worker(tmp_path, "b", fast, registry):
            job = await wait_for_status(client, blocker, "success", "failed", within=60)
            finished = [await wait_for_status(client, job_id, "success", "failed", within=60) for job_id in others]

    assert job["status"] == "failed", job
    assert job["error"].startswith("step block lost its lease 2 times in a row without progress"), job["error"]
    # A worker notes its block in the history once its loop runs again, so a claim made while the other worker is
    # still blocked does not count that one yet: one takeover more, at most, per other worker.
    assert 3 <= job["attempt"] <= 4 and job["steps"][0]["status"] == "failed", job
    assert [other["status"] for other in finished] == ["success"] * len(others)
    # Each step of the others succeeded exactly once, and no two workers ever ran one of them at once.
    await assert_no_step_ran_on_two_workers_at_once(db, others, steps=3, expect_takeover=False)
    log = (tmp_path / "a.log").read_text(encoding="utf-8") + (tmp_path / "b.log").read_text(encoding="utf-8")
    assert "step block blocked the event loop for 4.0s" in log
    assert "event loop blocked for" in log
