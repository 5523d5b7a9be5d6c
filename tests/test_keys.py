"""API keys managed at run time through `/ops/keys`: minted with a team, scopes and target patterns, listed without
their secret, revoked and expired, and refused at once by every API process."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from service.settings import Settings
from tests.conftest import KEYS, headers, live_api, submit, wait_for
from tests.processes import serving_api
from tests.test_cli import apiops

OPERATOR = headers("operator")


async def _mint(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/ops/keys", json={"scopes": ["jobs:read", "jobs:write"], **body}, headers=OPERATOR)
    assert response.status_code == 201, response.text
    minted: dict[str, Any] = response.json()
    return minted


async def test_a_minted_key_works_at_once_within_its_team_and_targets_and_is_listed_without_its_secret(
    client: httpx.AsyncClient, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.api.keys")
    default_job = await submit(client)
    minted = await _mint(client, name="ci-payments", team="payments", targets=["noop/staging/*"])
    assert minted["key"].startswith("apiops_") and minted["id"].startswith("key-")
    assert (minted["team"], minted["status"], minted["created_by"]) == ("payments", "active", "operator")
    key = {"X-API-Key": minted["key"]}

    submitted = await client.post("/ops/jobs/noop", json={"target": "staging/a"}, headers=key)
    assert submitted.status_code == 202, submitted.text
    assert (submitted.json()["team"], submitted.json()["actor"]) == ("payments", "ci-payments")
    assert (await client.post("/ops/jobs/noop", json={"target": "prod/a"}, headers=key)).status_code == 403
    assert (await client.get(f"/ops/jobs/{default_job}", headers=key)).status_code == 404

    listed = (await client.get("/ops/keys", headers=OPERATOR)).json()["keys"]
    (shown,) = [k for k in listed if k["id"] == minted["id"]]
    assert "key" not in shown and "sha256" not in shown and minted["key"] not in str(listed)
    assert shown["last_used_at"] is not None and shown["created_from"] == "10.1.2.3"
    stored = await db.fetchval("SELECT sha256 FROM ops_api_key WHERE key_id = $1", minted["id"])
    assert minted["key"].encode() not in stored  # only the hash is kept
    logged = f"API key {minted['id']} (ci-payments of team payments, scopes jobs:read,jobs:write) created by operator"
    assert logged in caplog.text


async def test_only_the_service_admin_manages_keys(client: httpx.AsyncClient) -> None:
    minted = await _mint(client, name="x", team="blue")
    for who in ("writer", "admin", "blue-admin"):
        for method, path in [("GET", "/ops/keys"), ("POST", "/ops/keys"), ("DELETE", f"/ops/keys/{minted['id']}")]:
            response = await client.request(method, path, json={}, headers=headers(who))
            assert response.status_code == 403, (who, method, response.text)
            assert "lacks the scope 'admin'" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "team": "Blue Team", "scopes": ["jobs:read"]}, "team"),
        ({"name": "x", "team": "blue", "scopes": []}, "scopes"),
        ({"name": "x", "team": "blue", "scopes": ["jobs:root"]}, "scopes.0"),
        ({"name": "x", "team": "blue", "scopes": ["jobs:read"], "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "x", "team": "blue", "scopes": ["jobs:read"], "targets": []}, "targets"),
        ({"team": "blue", "scopes": ["jobs:read"]}, "name"),
        ({"name": "x", "team": "blue", "scopes": ["jobs:read"], "owner": "me"}, "owner"),
    ],
)
async def test_an_invalid_key_request_is_422_naming_the_field_and_writes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/ops/keys", json=body, headers=OPERATOR)
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == [field]
    assert await db.fetchval("SELECT count(*) FROM ops_api_key") == 0


async def test_a_revoked_key_is_refused_at_once_and_revoking_twice_or_an_unknown_key_says_so(
    client: httpx.AsyncClient,
) -> None:
    minted = await _mint(client, name="leaked", team="blue")
    key = {"X-API-Key": minted["key"]}
    assert (await client.get("/ops/jobs", headers=key)).status_code == 200  # looked up, and cached

    revoked = await client.delete(f"/ops/keys/{minted['id']}", headers=OPERATOR)
    assert revoked.status_code == 200, revoked.text
    assert (revoked.json()["status"], revoked.json()["revoked_by"]) == ("revoked", "operator")
    refused = await client.get("/ops/jobs", headers=key)
    assert refused.status_code == 401 and refused.json()["error"]["message"] == "unknown API key"

    again = await client.delete(f"/ops/keys/{minted['id']}", headers=OPERATOR)
    assert again.status_code == 409 and "already revoked" in again.json()["error"]["message"]
    assert (await client.delete("/ops/keys/key-nope", headers=OPERATOR)).status_code == 404


async def test_an_expired_key_is_refused_from_its_expiry_on(client: httpx.AsyncClient) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=2)
    minted = await _mint(client, name="temp", team="blue", expires_at=expires.isoformat())
    key = {"X-API-Key": minted["key"]}
    assert (await client.get("/ops/jobs", headers=key)).status_code == 200

    async def status() -> int:
        return (await client.get("/ops/jobs", headers=key)).status_code

    await wait_for(status, within=10, interval=0.1, until=lambda code: code == 401)
    assert datetime.now(UTC) >= expires
    listed = (await client.get("/ops/keys", headers=OPERATOR)).json()["keys"]
    assert [k["status"] for k in listed if k["id"] == minted["id"]] == ["expired"]


async def test_a_key_revoked_through_one_api_process_is_refused_by_another_within_a_second(
    settings: Settings,
) -> None:
    async with serving_api(settings) as (_, first), serving_api(settings) as (_, second):
        one = httpx.AsyncClient(base_url=f"http://127.0.0.1:{first}")
        other = httpx.AsyncClient(base_url=f"http://127.0.0.1:{second}")
        async with one, other:
            minted = await _mint(one, name="leaked", team="blue")
            key = {"X-API-Key": minted["key"]}
            # Both processes have looked the key up, and hold it in their caches.
            assert (await one.get("/ops/jobs", headers=key)).status_code == 200
            assert (await other.get("/ops/jobs", headers=key)).status_code == 200
            assert (await one.delete(f"/ops/keys/{minted['id']}", headers=OPERATOR)).status_code == 200

            async def status() -> int:
                return (await other.get("/ops/jobs", headers=key)).status_code

            await wait_for(status, within=1.0, interval=0.01, until=lambda code: code == 401)


async def test_the_cli_mints_lists_and_revokes_keys_through_the_api(settings: Settings) -> None:
    async with live_api(settings) as url:
        minted = await apiops(
            url, "keys", "new", "bob", "--team", "blue", "--targets", "noop/*", key=KEYS["operator"].key
        )
        assert minted.code == 0, minted
        key_id = minted.lines[0].split()[2]
        key = minted.lines[1]
        assert minted.lines[0] == f"API key {key_id} for bob of team blue (shown once; store it now):"
        submitted = await apiops(url, "submit", "noop", "target=x", key=key)
        assert submitted.code == 0, submitted

        listed = await apiops(url, "keys", "list", key=KEYS["operator"].key)
        assert listed.code == 0 and key not in listed.out
        (row,) = [line.split() for line in listed.lines if line.startswith(key_id)]
        assert row[1:6] == ["bob", "blue", "jobs:read,jobs:write", "noop/*", "active"]

        revoked = await apiops(url, "keys", "revoke", key_id, key=KEYS["operator"].key)
        assert revoked.out == f"{key_id}: revoked; every API process refuses it from now on\n", revoked
        refused = await apiops(url, "list", key=key)
        assert refused.code == 3 and refused.err == "apiops: 401 unauthorized: unknown API key\n"
        not_admin = await apiops(url, "keys", "list", key=KEYS["admin"].key)
        assert not_admin.code == 3 and "lacks the scope 'admin'" in not_admin.err
