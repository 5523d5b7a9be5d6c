"""Approvals as people at terminals meet them: the requester watches the wait, a colleague lists what awaits
approval and approves or rejects it with `apiops`, and `/metrics` counts what waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from service.settings import ApprovalPolicy, Settings
from tests.conftest import KEYS, headers, live_api, running_worker
from tests.test_cli import apiops, finish, start
from tests.test_metrics import scrape, value


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    policy = ApprovalPolicy(job_type="noop", targets=("noop/prod/*",), approvals=1)
    approving = settings.model_copy(update={"approval_policies": (policy,)})
    async with live_api(approving) as base_url, running_worker(approving):
        yield base_url


async def test_a_watch_shows_the_wait_a_colleague_approves_and_the_job_runs(url: str) -> None:
    job_id = (await apiops(url, "submit", "noop", "target=prod/db", "steps=1")).out.strip()
    watcher = await start(url, "watch", job_id)
    assert watcher.stdout is not None
    async with asyncio.timeout(15):
        while b"job awaiting approval: needs 1 approval(s)" not in await watcher.stdout.readline():
            pass

    waiting = await apiops(url, "list", "--status", "awaiting_approval", key=KEYS["approver"].key)
    assert waiting.code == 0 and waiting.lines[1].split()[:3] == [job_id, "noop", "awaiting_approval"], waiting
    own = await apiops(url, "approve", job_id, key=KEYS["admin"].key)  # jobs:admin, but not the requester
    assert own.code == 0, own
    assert own.out == f"{job_id}: approved (1 of 1); it runs now\n"

    watched = await finish(watcher)
    assert watched.code == 0 and watched.lines[-1].endswith("job success"), watched
    assert any("job approved by admin: approval 1 of 1; it runs now" in line for line in watched.lines), watched


async def test_the_requester_cannot_approve_and_a_rejection_ends_the_watch_with_4(url: str) -> None:
    job_id = (await apiops(url, "submit", "noop", "target=prod/db", key=KEYS["admin"].key)).out.strip()
    refused = await apiops(url, "approve", job_id, key=KEYS["admin"].key)
    assert refused.code == 3, refused
    assert (
        refused.err
        == f"apiops: 403 forbidden: 'admin' submitted job {job_id}; its approval must come from someone else\n"
    )
    no_reason = await apiops(url, "reject", job_id, key=KEYS["approver"].key)
    assert no_reason.code == 2 and "--reason" in no_reason.err

    watcher = await start(url, "watch", job_id)
    rejected = await apiops(url, "reject", job_id, "--reason", "freeze", key=KEYS["approver"].key)
    assert rejected.out == f"{job_id}: rejected; it will not run\n", rejected
    watched = await finish(watcher)
    assert watched.code == 4, watched
    assert "job rejected by approver: freeze" in watched.out and watched.lines[-1].endswith("job rejected")
    shown = await apiops(url, "get", job_id)
    assert "error:    rejected by approver: freeze" in shown.out, shown.out


async def test_metrics_count_the_jobs_awaiting_approval(url: str) -> None:
    await apiops(url, "submit", "noop", "target=prod/a")
    async with httpx.AsyncClient(base_url=url, headers=headers("writer")) as client:
        samples = await scrape(client)
    assert value(samples, "apiops_jobs", type="noop", status="awaiting_approval") == 1
    assert value(samples, "apiops_jobs", type="noop", status="rejected") == 0
