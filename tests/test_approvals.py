"""The two-person rule: submissions under an approval policy wait, holding their target and never delivered, until
other people of the team approve them; a rejection or the deadline ends them; every decision is in the history."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from service.settings import ApprovalPolicy, Settings
from tests.conftest import api_client, headers, read_job, running_worker, wait_for_status

PROD = {"target": "prod/db", "steps": 1}


def _policy(**overrides: Any) -> ApprovalPolicy:
    return ApprovalPolicy.model_validate({"job_type": "noop", "targets": ["noop/prod/*"], **overrides})


@pytest.fixture
def policies() -> tuple[ApprovalPolicy, ...]:
    return (_policy(),)


@pytest.fixture
def approving(settings: Settings, policies: tuple[ApprovalPolicy, ...]) -> Settings:
    return settings.model_copy(update={"approval_policies": policies})


@pytest.fixture
async def api(approving: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(approving, headers=headers("writer")) as client:
        yield client


async def _submit(api: httpx.AsyncClient, who: str = "writer", **params: Any) -> dict[str, Any]:
    response = await api.post("/ops/jobs/noop", json=params or PROD, headers=headers(who))
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def _approve(api: httpx.AsyncClient, job_id: str, who: str, **body: Any) -> httpx.Response:
    return await api.post(f"/ops/jobs/{job_id}/approve", json=body, headers=headers(who))


async def _history(db: asyncpg.Connection, job_id: str) -> list[tuple[str, str | None, str | None, str | None]]:
    rows = await db.fetch(
        "SELECT kind, status, actor, detail FROM ops_job_event WHERE job_id = $1 ORDER BY event_id", job_id
    )
    return [(r["kind"], r["status"], r["actor"], r["detail"]) for r in rows]


async def _queued(redis: Redis, settings: Settings) -> int:
    count: int = await redis.zcard(settings.queue_name)
    return count


async def test_a_submission_under_a_policy_waits_holding_its_target_and_is_never_delivered(
    api: httpx.AsyncClient, approving: Settings, redis: Redis, db: asyncpg.Connection
) -> None:
    job = await _submit(api)
    assert (job["status"], job["approvals_required"], job["approvals_given"]) == ("awaiting_approval", 1, 0)
    assert job["approval_expires_at"] is not None
    assert await _queued(redis, approving) == 0  # not delivered to any worker
    busy = await api.post("/ops/jobs/noop", json=PROD)
    assert busy.status_code == 409 and job["job_id"] in busy.text  # it holds its target
    assert [(kind, status) for kind, status, *_ in await _history(db, job["job_id"])] == [
        ("created", "awaiting_approval"),
        ("approval_requested", "awaiting_approval"),
    ]
    uncovered = await _submit(api, target="staging/db")
    assert uncovered["status"] == "pending" and uncovered["approvals_required"] is None
    assert await _queued(redis, approving) == 1


@pytest.mark.parametrize("policies", [(ApprovalPolicy(job_type="pg-rebuild"),)])
async def test_a_dry_run_never_needs_approval(api: httpx.AsyncClient) -> None:
    params = {"namespace": "db", "cluster": "pg", "pod": "pg-1"}
    dry = await api.post("/ops/jobs/pg-rebuild", json={**params, "dry_run": True})
    assert dry.status_code == 202 and dry.json()["status"] == "pending"
    await api.post(f"/ops/jobs/{dry.json()['job_id']}/cancel")
    real = await api.post("/ops/jobs/pg-rebuild", json=params)
    assert real.status_code == 202 and real.json()["status"] == "awaiting_approval"


async def test_another_persons_approval_runs_it_and_the_history_says_who_asked_and_who_approved(
    api: httpx.AsyncClient, approving: Settings, db: asyncpg.Connection
) -> None:
    job_id = (await _submit(api))["job_id"]
    async with running_worker(approving):
        approved = await _approve(api, job_id, "approver", reason="change CHG-42")
        assert approved.status_code == 200, approved.text
        assert approved.json()["status"] in ("pending", "running", "success")
        done = await wait_for_status(api, job_id, "success", "failed")
    assert done["status"] == "success" and done["approvals_given"] == 1
    history = await _history(db, job_id)
    assert history[0][:3] == ("created", "awaiting_approval", "writer")
    assert history[2] == ("approved", "pending", "approver", "approval 1 of 1: change CHG-42")
    row = await db.fetchrow("SELECT team, source_ip, reason FROM ops_job_approval WHERE job_id = $1", job_id)
    assert row is not None and dict(row) == {"team": "default", "source_ip": "10.1.2.3", "reason": "change CHG-42"}


async def test_the_requester_can_never_approve_their_own_job(api: httpx.AsyncClient) -> None:
    job_id = (await _submit(api, who="admin"))["job_id"]  # jobs:admin may approve, but not its own
    refused = await _approve(api, job_id, "admin")
    assert refused.status_code == 403, refused.text
    assert (
        refused.json()["error"]["message"]
        == f"'admin' submitted job {job_id}; its approval must come from someone else"
    )
    assert (await read_job(api, job_id))["status"] == "awaiting_approval"


@pytest.mark.parametrize("policies", [(_policy(approvals=2),)])
async def test_two_of_many_each_person_once(api: httpx.AsyncClient, approving: Settings, redis: Redis) -> None:
    job_id = (await _submit(api))["job_id"]
    first = await _approve(api, job_id, "approver")
    assert (first.json()["status"], first.json()["approvals_given"]) == ("awaiting_approval", 1)
    twice = await _approve(api, job_id, "approver")
    assert twice.status_code == 409 and "has already approved" in twice.json()["error"]["message"]
    assert await _queued(redis, approving) == 0
    second = await _approve(api, job_id, "admin")
    assert (second.json()["status"], second.json()["approvals_given"]) == ("pending", 2)
    assert await _queued(redis, approving) == 1


async def test_only_approvers_of_the_same_team_decide(api: httpx.AsyncClient) -> None:
    job_id = (await _submit(api))["job_id"]
    lacking = await _approve(api, job_id, "writer")
    assert lacking.status_code == 403 and "jobs:approve" in lacking.json()["error"]["message"]
    other_team = await _approve(api, job_id, "blue-admin")
    assert other_team.status_code == 404
    rejected_elsewhere = await api.post(
        f"/ops/jobs/{job_id}/reject", json={"reason": "no"}, headers=headers("blue-admin")
    )
    assert rejected_elsewhere.status_code == 404
    assert (await read_job(api, job_id))["status"] == "awaiting_approval"


async def test_a_rejection_needs_a_reason_and_ends_the_job_for_good(
    api: httpx.AsyncClient, approving: Settings, redis: Redis, db: asyncpg.Connection
) -> None:
    job_id = (await _submit(api))["job_id"]
    no_reason = await api.post(f"/ops/jobs/{job_id}/reject", json={}, headers=headers("approver"))
    assert no_reason.status_code == 422 and no_reason.json()["error"]["details"][0]["field"] == "reason"
    rejected = await api.post(
        f"/ops/jobs/{job_id}/reject", json={"reason": "not in a freeze"}, headers=headers("approver")
    )
    assert rejected.status_code == 200, rejected.text
    job = rejected.json()
    assert (job["status"], job["error"]) == ("rejected", "rejected by approver: not in a freeze")
    late = await _approve(api, job_id, "approver2")
    assert late.status_code == 409 and "is rejected, not awaiting approval" in late.json()["error"]["message"]
    assert (await api.post(f"/ops/jobs/{job_id}/retry")).status_code == 409
    assert await _queued(redis, approving) == 0
    assert [kind for kind, *_ in await _history(db, job_id)][-2:] == ["rejected", "finished"]


@pytest.mark.parametrize("policies", [(_policy(expires_s=0.5),)])
async def test_an_unapproved_job_is_rejected_at_its_deadline_and_takes_no_approval_after(
    api: httpx.AsyncClient, approving: Settings, db: asyncpg.Connection
) -> None:
    job_id = (await _submit(api))["job_id"]
    async with running_worker(approving.model_copy(update={"reaper_interval_s": 0.2})):
        job = await wait_for_status(api, job_id, "rejected", within=10)
    assert job["error"] == "approval expired"
    late = await _approve(api, job_id, "approver")
    assert late.status_code == 409
    history = await _history(db, job_id)
    kind, _, actor, detail = history[-2]
    assert kind == "rejected" and str(detail).startswith("approval expired: 0 of 1 approvals by ")
    assert str(actor).startswith("reaper:") and history[-1][:2] == ("finished", "rejected")


async def test_a_waiting_job_can_be_cancelled_and_its_retry_needs_approval_again(
    api: httpx.AsyncClient, approving: Settings, redis: Redis
) -> None:
    job_id = (await _submit(api))["job_id"]
    cancelled = await api.post(f"/ops/jobs/{job_id}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    retried = await api.post(f"/ops/jobs/{job_id}/retry")
    assert retried.status_code == 202, retried.text
    assert (retried.json()["status"], retried.json()["approvals_given"]) == ("awaiting_approval", 0)
    assert await _queued(redis, approving) == 0
    again = await _approve(api, job_id, "approver")
    assert again.status_code == 200 and again.json()["status"] == "pending"


async def test_two_approvers_at_once_make_exactly_one_transition(
    api: httpx.AsyncClient, approving: Settings, redis: Redis, db: asyncpg.Connection
) -> None:
    job_id = (await _submit(api))["job_id"]
    answers = await asyncio.gather(_approve(api, job_id, "approver"), _approve(api, job_id, "approver2"))
    assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
    assert [kind for kind, *_ in await _history(db, job_id)].count("approved") == 1
    assert await _queued(redis, approving) == 1


@pytest.mark.parametrize("policies", [(_policy(approvals=2),)])
async def test_two_last_approvals_at_once_both_count_and_the_job_runs_once(
    api: httpx.AsyncClient, approving: Settings, redis: Redis
) -> None:
    job_id = (await _submit(api))["job_id"]
    answers = await asyncio.gather(_approve(api, job_id, "approver"), _approve(api, job_id, "approver2"))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    job = await read_job(api, job_id)
    assert (job["status"], job["approvals_given"]) == ("pending", 2)
    assert await _queued(redis, approving) == 1


async def test_an_approval_racing_a_cancel_ends_in_one_consistent_state(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    job_id = (await _submit(api))["job_id"]
    approved, cancelled = await asyncio.gather(
        _approve(api, job_id, "approver"), api.post(f"/ops/jobs/{job_id}/cancel")
    )
    assert cancelled.status_code == 202, cancelled.text
    job = await read_job(api, job_id)
    assert job["status"] == "cancelled"
    kinds = [kind for kind, *_ in await _history(db, job_id)]
    if approved.status_code == 200:  # approved first: pending, then cancelled before it ran
        assert kinds[2:] == ["approved", "cancel_requested", "finished"]
    else:
        assert approved.status_code == 409 and kinds[2:] == ["cancel_requested", "finished"]
