"""API keys, scopes and the recorded client address."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr

from service.settings import Settings
from tests.conftest import api_client, headers


async def test_missing_or_unknown_key_is_401(client: httpx.AsyncClient) -> None:
    missing = await client.get("/ops/jobs", headers={"X-API-Key": ""})
    unknown = await client.get("/ops/jobs", headers={"X-API-Key": "guess"})

    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "unauthorized")
    assert (unknown.status_code, unknown.json()["error"]["message"]) == (401, "unknown API key")


async def test_every_ops_route_needs_a_key(settings: Settings) -> None:
    async with api_client(settings) as anonymous:
        for method, path in [
            ("GET", "/ops/jobs"),
            ("GET", "/ops/jobs/noop-x"),
            ("POST", "/ops/jobs/noop"),
            ("GET", "/ops/job-types"),
        ]:
            response = await anonymous.request(method, path)
            assert response.status_code == 401, (method, path)


async def test_read_scope_cannot_submit(client: httpx.AsyncClient) -> None:
    response = await client.post("/ops/jobs/noop", json={}, headers=headers("reader"))

    assert response.status_code == 403
    assert response.json()["error"] == {
        "code": "forbidden",
        "message": "API key 'reader' lacks the scope 'jobs:write'",
        "details": {"scope": "jobs:write"},
    }
    assert (await client.get("/ops/jobs", headers=headers("reader"))).status_code == 200


async def test_admin_scope_implies_the_others_and_names_the_actor(client: httpx.AsyncClient) -> None:
    response = await client.post("/ops/jobs/noop", json={}, headers=headers("admin"))

    assert response.status_code == 202
    assert response.json()["actor"] == "admin"


async def test_dev_key_works_only_in_dev_mode(settings: Settings) -> None:
    dev_headers = {"X-API-Key": "dev-api-key-12345"}
    async with api_client(settings) as dev:
        response = await dev.post("/ops/jobs/noop", json={}, headers=dev_headers)
        assert response.status_code == 202
        assert response.json()["actor"] == "dev"

    prod_settings = settings.model_copy(update={"env": "prod", "session_secret": SecretStr("s" * 32)})
    async with api_client(prod_settings) as prod:
        assert (await prod.get("/ops/jobs", headers=dev_headers)).status_code == 401
        assert (await prod.get("/ops/jobs", headers=headers("reader"))).status_code == 200


async def test_forwarded_address_is_believed_only_from_a_trusted_proxy(settings: Settings) -> None:
    forwarded = {**headers("writer"), "X-Forwarded-For": "203.0.113.9, 10.1.2.4"}

    async with api_client(settings) as direct:
        untrusted = (await direct.post("/ops/jobs/noop", json={}, headers=forwarded)).json()
    proxied_settings = settings.model_copy(
        update={"trusted_proxies": Settings(trusted_proxies="10.1.2.0/24").trusted_proxies}
    )
    async with api_client(proxied_settings) as behind_proxy:
        trusted = (await behind_proxy.post("/ops/jobs/noop", json={}, headers=forwarded)).json()

    assert untrusted["source_ip"] == "10.1.2.3"
    # Both the peer and the nearest hop are proxies we trust; the client is the first untrusted hop.
    assert trusted["source_ip"] == "203.0.113.9"


@pytest.mark.parametrize(
    ("forwarded", "recorded"),
    [
        ("<script>alert(1)</script>", "10.1.2.3"),
        ("9" * 3000, "10.1.2.3"),
        ("203.0.113.9, <script>", "10.1.2.3"),  # the walk stops at the first hop that is no address
        ("<script>, 203.0.113.9", "203.0.113.9"),
        ("203.0.113.9:4711", "203.0.113.9"),
        ("[2001:db8::7]:4711", "2001:db8::7"),
        (" , ", "10.1.2.3"),
    ],
)
async def test_source_ip_is_always_an_address_whatever_a_trusted_peer_forwards(
    settings: Settings, forwarded: str, recorded: str
) -> None:
    proxied = settings.model_copy(update={"trusted_proxies": Settings(trusted_proxies="10.1.2.3").trusted_proxies})
    async with api_client(proxied, headers={**headers("writer"), "X-Forwarded-For": forwarded}) as behind_proxy:
        job = (await behind_proxy.post("/ops/jobs/noop", json={})).json()
    assert job["source_ip"] == recorded
