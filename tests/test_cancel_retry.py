"""Cancel and retry over HTTP, with a real worker."""

from __future__ import annotations

import time

import asyncpg
import httpx
from arq.worker import Worker

from tests import testjobs
from tests.conftest import headers, wait_for, wait_for_status


async def _events(db: asyncpg.Connection, job_id: str) -> list[tuple[str, str | None, str | None]]:
    rows = await db.fetch("SELECT kind, step, status FROM ops_job_event WHERE job_id = $1 ORDER BY event_id", job_id)
    return [(r["kind"], r["step"], r["status"]) for r in rows]


async def test_cancelling_a_pending_job_cancels_it_at_once(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 2})).json()["job_id"]

    response = await client.post(f"/ops/jobs/{job_id}/cancel")

    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    assert job["error"] == "cancelled by writer before it ran"
    assert [s["status"] for s in job["steps"]] == ["pending", "pending"]
    assert await _events(db, job_id) == [
        ("created", None, "pending"),
        ("cancel_requested", None, "pending"),
        ("finished", None, "cancelled"),
    ]


async def test_a_cancelled_pending_job_never_runs(
    client: httpx.AsyncClient, db: asyncpg.Connection, worker: Worker
) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 1})).json()["job_id"]
    await client.post(f"/ops/jobs/{job_id}/cancel")
    later = (await client.post("/ops/jobs/noop", json={"steps": 1})).json()["job_id"]

    await wait_for_status(client, later, "success")

    assert (await client.get(f"/ops/jobs/{job_id}")).json()["status"] == "cancelled"
    assert await db.fetchval("SELECT count(*) FROM ops_job_event WHERE job_id = $1 AND kind = 'claimed'", job_id) == 0


async def test_cancelling_a_running_job_stops_its_step_within_one_second(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 2, "sleep_s": 30})).json()["job_id"]

    async def first_step_sleeping() -> bool:
        steps = (await client.get(f"/ops/jobs/{job_id}")).json()["steps"]
        return bool(steps[0]["detail"] == "sleeping 30s")

    await wait_for(first_step_sleeping)

    asked = time.monotonic()
    assert (await client.post(f"/ops/jobs/{job_id}/cancel")).status_code == 202
    job = await wait_for_status(client, job_id, "cancelled", "success", "failed", within=3)
    latency = time.monotonic() - asked

    assert job["status"] == "cancelled"
    assert latency < 1.0, f"cancel took {latency:.2f}s"
    assert job["error"].startswith("cancelled by writer at ")
    first, second = job["steps"]
    assert first["status"] == "cancelled" and first["detail"] == "cancelled; it was at: sleeping 30s"
    assert first["finished_at"] is not None
    assert second["status"] == "pending" and second["attempts"] == 0


async def test_cancel_is_refused_for_finished_unknown_and_other_actors_jobs(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    done = (await client.post("/ops/jobs/noop", json={})).json()["job_id"]
    await wait_for_status(client, done, "success")
    admins = (await client.post("/ops/jobs/noop", json={"sleep_s": 5}, headers=headers("admin"))).json()["job_id"]

    finished = await client.post(f"/ops/jobs/{done}/cancel")
    unknown = await client.post("/ops/jobs/noop-nope/cancel")
    others = await client.post(f"/ops/jobs/{admins}/cancel")
    reader = await client.post(f"/ops/jobs/{admins}/cancel", headers=headers("reader"))

    assert (finished.status_code, finished.json()["error"]["code"]) == (409, "conflict")
    assert finished.json()["error"]["message"] == f"job {done} is already success; there is nothing to cancel"
    assert unknown.status_code == 404
    assert (others.status_code, others.json()["error"]["details"]) == (403, {"scope": "jobs:admin"})
    assert reader.status_code == 403
    assert (await client.post(f"/ops/jobs/{admins}/cancel", headers=headers("admin"))).status_code == 202


async def test_retry_runs_a_failed_job_again_from_the_failed_step(
    client: httpx.AsyncClient, db: asyncpg.Connection, worker: Worker
) -> None:
    job_id = (await client.post("/ops/jobs/fragile", json={})).json()["job_id"]
    testjobs.BROKEN.add(job_id)
    failed = await wait_for_status(client, job_id, "failed", "success")
    assert [s["status"] for s in failed["steps"]] == ["success", "failed", "pending"]

    testjobs.BROKEN.discard(job_id)
    response = await client.post(f"/ops/jobs/{job_id}/retry")
    assert response.status_code == 202 and response.json()["status"] == "pending"
    job = await wait_for_status(client, job_id, "success", "failed")

    assert job["status"] == "success" and job["error"] is None and job["attempt"] == 2
    assert [(s["name"], s["attempts"]) for s in job["steps"]] == [("prepare", 1), ("act", 2), ("verify", 1)]
    kinds = [kind for kind, _, _ in await _events(db, job_id)]
    assert kinds.count("claimed") == 2 and "retried" in kinds
    assert kinds.index("retried") > kinds.index("finished")


async def test_retry_is_refused_unless_failed_or_cancelled(client: httpx.AsyncClient, worker: Worker) -> None:
    done = (await client.post("/ops/jobs/noop", json={})).json()["job_id"]
    await wait_for_status(client, done, "success")

    response = await client.post(f"/ops/jobs/{done}/retry")

    assert response.status_code == 409
    assert (
        response.json()["error"]["message"] == f"job {done} is success; only a failed or cancelled job can be retried"
    )


async def test_retry_of_a_cancelled_job_waits_for_the_target_to_be_free(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    first = (await client.post("/ops/jobs/noop", json={"target": "db/x", "sleep_s": 30})).json()["job_id"]
    await client.post(f"/ops/jobs/{first}/cancel")
    await wait_for_status(client, first, "cancelled")
    second = (await client.post("/ops/jobs/noop", json={"target": "db/x", "sleep_s": 30})).json()["job_id"]

    blocked = await client.post(f"/ops/jobs/{first}/retry")

    assert blocked.status_code == 409
    assert blocked.json()["error"]["details"]["blocking_job_id"] == second
    await client.post(f"/ops/jobs/{second}/cancel")
    await wait_for_status(client, second, "cancelled")
    assert (await client.post(f"/ops/jobs/{first}/retry")).status_code == 202


async def test_job_history_lists_every_transition_with_who_and_where(client: httpx.AsyncClient, worker: Worker) -> None:
    job_id = (await client.post("/ops/jobs/noop", json={"steps": 2})).json()["job_id"]
    await wait_for_status(client, job_id, "success")

    job = (await client.get(f"/ops/jobs/{job_id}", params={"include": "events"})).json()

    events = job["events"]
    assert [(e["kind"], e["step"], e["status"]) for e in events] == [
        ("created", None, "pending"),
        ("claimed", None, "running"),
        ("step", "step-1", "running"),
        ("step", "step-1", "success"),
        ("step", "step-2", "running"),
        ("step", "step-2", "success"),
        ("finished", None, "success"),
    ]
    assert (events[0]["actor"], events[0]["source_ip"]) == ("writer", "10.1.2.3")
    assert all(e["actor"].startswith("worker:") and e["attempt"] == 1 for e in events[1:])
    assert "events" not in (await client.get(f"/ops/jobs/{job_id}")).json()
    assert (await client.get(f"/ops/jobs/{job_id}", params={"include": "logs"})).status_code == 422
