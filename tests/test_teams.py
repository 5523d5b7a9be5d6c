"""Teams: a key sees and acts on its own team's jobs only, and submits only for the targets it may touch; a job
type names its targets inside a namespace of its own kind; exclusion per target holds across teams."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx

from service.settings import Settings
from tests.conftest import headers, submit, wait_for
from tests.processes import serving_api


async def _count_jobs(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM ops_job")
    return count


async def test_another_teams_job_is_not_found_on_every_route(client: httpx.AsyncClient) -> None:
    red = await submit(client, steps=1)  # the default team's writer; no worker: it stays pending
    blue = headers("blue-writer")  # another team's key, of the same name ("writer")

    for method, path in [
        ("GET", f"/ops/jobs/{red}"),
        ("GET", f"/ops/jobs/{red}?include=events"),
        ("GET", f"/ops/jobs/{red}/events"),
        ("POST", f"/ops/jobs/{red}/cancel"),
        ("POST", f"/ops/jobs/{red}/retry"),
    ]:
        response = await client.request(method, path, headers=blue)
        assert response.status_code == 404, (method, path, response.text)
        # The same answer as for a job that does not exist: nothing tells it apart.
        assert response.json()["error"] == {"code": "not_found", "message": f"no job {red!r}"}

    for filters in [{}, {"type": "noop"}, {"status": "pending"}, {"actor": "writer"}, {"team": "default"}]:
        listed = await client.get("/ops/jobs", params=filters, headers=blue)
        assert listed.status_code == 200 and listed.json()["jobs"] == [], (filters, listed.text)
    assert (await client.get(f"/ops/jobs/{red}")).json()["status"] == "pending"  # untouched, and its team sees it


async def test_each_team_lists_its_own_jobs_and_the_service_admin_sees_every_team(client: httpx.AsyncClient) -> None:
    red = await submit(client)
    blue = (await client.post("/ops/jobs/noop", json={}, headers=headers("blue-writer"))).json()

    async def listed(who: str, **filters: str) -> list[str]:
        response = await client.get("/ops/jobs", params=filters, headers=headers(who))
        assert response.status_code == 200, response.text
        return [job["job_id"] for job in response.json()["jobs"]]

    assert blue["team"] == "blue" and blue["actor"] == "writer"
    assert await listed("writer") == [red]
    assert await listed("blue-writer") == [blue["job_id"]]
    assert await listed("blue-admin") == [blue["job_id"]]
    assert await listed("operator") == [blue["job_id"], red]
    assert await listed("operator", team="blue") == [blue["job_id"]]
    assert (await client.get(f"/ops/jobs/{blue['job_id']}", headers=headers("operator"))).status_code == 200


async def test_jobs_admin_acts_on_its_own_teams_jobs_only_and_admin_on_any(client: httpx.AsyncClient) -> None:
    first, second = await submit(client), await submit(client)
    by_blue_admin = await client.post(f"/ops/jobs/{first}/cancel", headers=headers("blue-admin"))
    assert by_blue_admin.status_code == 404
    by_own_admin = await client.post(f"/ops/jobs/{first}/cancel", headers=headers("admin"))
    assert by_own_admin.status_code == 202 and by_own_admin.json()["status"] == "cancelled"
    by_operator = await client.post(f"/ops/jobs/{second}/cancel", headers=headers("operator"))
    assert by_operator.status_code == 202 and by_operator.json()["status"] == "cancelled"


async def test_a_key_limited_to_target_patterns_may_submit_only_for_those(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    staging = headers("blue-staging")  # may act on noop/staging/*
    refused = await client.post("/ops/jobs/noop", json={"target": "prod/payments"}, headers=staging)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "forbidden"
    assert "'noop/prod/payments'" in error["message"] and "'noop/staging/*'" in error["message"]
    assert error["details"] == {"target": "noop/prod/payments", "allowed_targets": ["noop/staging/*"]}
    assert await _count_jobs(db) == 0  # nothing written

    accepted = await client.post("/ops/jobs/noop", json={"target": "staging/eu/db"}, headers=staging)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["target"] == "noop/staging/eu/db"  # `*` spans the slashes
    untargeted = await client.post("/ops/jobs/noop", json={}, headers=staging)
    assert untargeted.status_code == 202 and untargeted.json()["target"] is None  # acts on nothing shared


async def test_a_noop_cannot_claim_a_clusters_target_so_it_never_blocks_its_rebuild(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    squatter = await client.post("/ops/jobs/noop", json={"target": "k8s/default/db/pg", "steps": 1})
    assert squatter.json()["target"] == "noop/k8s/default/db/pg"
    rebuild = await client.post(
        "/ops/jobs/pg-rebuild", json={"namespace": "db", "cluster": "pg", "pod": "pg-1", "dry_run": True}
    )
    assert rebuild.status_code == 202, rebuild.text
    assert rebuild.json()["target"] == "k8s/default/db/pg"


async def test_a_target_is_held_across_teams_without_naming_the_other_teams_job(client: httpx.AsyncClient) -> None:
    held = await submit(client, target="shared")
    from_blue = await client.post("/ops/jobs/noop", json={"target": "shared"}, headers=headers("blue-writer"))
    assert from_blue.status_code == 409, from_blue.text
    error = from_blue.json()["error"]
    assert error["message"] == "target 'noop/shared' is busy with another team's job; try again once it has finished"
    assert held not in from_blue.text
    from_own_team = await client.post("/ops/jobs/noop", json={"target": "shared"}, headers=headers("admin"))
    assert from_own_team.status_code == 409 and from_own_team.json()["error"]["details"]["blocking_job_id"] == held


async def test_the_same_idempotency_key_of_same_named_keys_in_two_teams_makes_two_jobs(
    client: httpx.AsyncClient,
) -> None:
    key = {"Idempotency-Key": "nightly-1"}
    red = await client.post("/ops/jobs/noop", json={}, headers=key)
    blue = await client.post("/ops/jobs/noop", json={}, headers={**key, **headers("blue-writer")})
    assert (red.status_code, blue.status_code) == (202, 202)
    assert red.json()["job_id"] != blue.json()["job_id"]
    replayed = await client.post("/ops/jobs/noop", json={}, headers={**key, **headers("blue-writer")})
    assert replayed.status_code == 200 and replayed.json()["job_id"] == blue.json()["job_id"]


async def test_workers_show_each_team_only_its_own_running_jobs(client: httpx.AsyncClient, worker: Any) -> None:
    red = await submit(client, steps=1, sleep_s=30)
    blue = await client.post("/ops/jobs/noop", json={"steps": 1, "sleep_s": 30}, headers=headers("blue-writer"))

    async def running(who: str) -> set[str]:
        workers = (await client.get("/ops/workers", headers=headers(who))).json()["workers"]
        return {job for w in workers for job in w["running"]}

    async def both_shown() -> set[str]:
        return await running("operator")

    # Once both run, the heartbeat that names them may be a beat away.
    await wait_for(both_shown, within=15, until=lambda jobs: jobs == {red, blue.json()["job_id"]})
    assert await running("writer") == {red}
    assert await running("blue-writer") == {blue.json()["job_id"]}


async def test_isolation_holds_over_http_against_a_real_api_process(settings: Settings) -> None:
    async with serving_api(settings) as (_, port), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
        red = (await api.post("/ops/jobs/noop", json={"steps": 1}, headers=headers("writer"))).json()["job_id"]
        blue = headers("blue-admin")  # every scope of its own team
        for method, path in [
            ("GET", f"/ops/jobs/{red}"),
            ("GET", f"/ops/jobs/{red}/events"),
            ("POST", f"/ops/jobs/{red}/cancel"),
            ("POST", f"/ops/jobs/{red}/retry"),
            ("POST", f"/ops/jobs/{red}/approve"),
            ("POST", f"/ops/jobs/{red}/reject"),
        ]:
            body = {"reason": "x"} if path.endswith("reject") else None
            response = await api.request(method, path, headers=blue, json=body)
            assert response.status_code == 404, (method, path, response.text)
        assert (await api.get("/ops/jobs", params={"status": "pending"}, headers=blue)).json()["jobs"] == []
        assert (await api.get(f"/ops/jobs/{red}", headers=headers("operator"))).status_code == 200
