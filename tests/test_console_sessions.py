"""The console's sessions over HTTP (no browser): what the cookie may do, and when it stops working."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from service.api.session import COOKIE
from service.settings import Settings
from tests.conftest import KEYS, api_client, headers


@pytest.fixture
async def browserish(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client as a browser is: no API key header, cookies kept."""
    async with api_client(settings) as client:
        yield client


ORIGIN = {"Origin": "http://apiops.test"}


async def _sign_in(browserish: httpx.AsyncClient, key: str, **form: str) -> httpx.Response:
    return await browserish.post("/ui/sign-in", data={"key": key, **form}, headers=ORIGIN)


async def test_a_session_cookie_is_hardened_and_reads_the_json_api_but_never_writes_it(
    browserish: httpx.AsyncClient,
) -> None:
    signed_in = await _sign_in(browserish, KEYS["writer"][0], next="/ui/jobs/x?history=changes")
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ui/jobs/x?history=changes"
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    assert KEYS["writer"][0] not in cookie  # the key's hash, never the key
    assert "Secure" not in cookie  # dev: plain http on loopback

    assert (await browserish.get("/ops/jobs")).status_code == 200  # the console's live streams read this way
    refused = await browserish.post("/ops/jobs/noop", json={})
    assert refused.status_code == 401, "a cookie must never write through the JSON API"

    await browserish.post("/ui/sign-out", data={"csrf": "wrong"}, headers=ORIGIN)  # a forged sign-out does nothing
    assert (await browserish.get("/ops/jobs")).status_code == 200


async def test_sign_in_refuses_unknown_keys_foreign_origins_and_redirects_only_to_the_console(
    browserish: httpx.AsyncClient,
) -> None:
    unknown = await _sign_in(browserish, "not-a-key")
    assert unknown.status_code == 401 and "unknown API key" in unknown.text and COOKIE not in unknown.cookies
    foreign = await browserish.post("/ui/sign-in", data={"key": KEYS["writer"][0]}, headers={"Origin": "http://evil"})
    assert foreign.status_code == 403 and COOKIE not in foreign.cookies
    for elsewhere in ("https://evil.example/", "//evil.example/ui/", "/ops/keys", "/ui\\..\\x"):
        response = await _sign_in(browserish, KEYS["writer"][0], next=elsewhere)
        assert response.headers["location"] == "/ui/", elsewhere


async def test_revoking_a_key_ends_its_console_sessions_at_once(browserish: httpx.AsyncClient) -> None:
    response = await browserish.post(
        "/ops/keys", json={"name": "oncall", "team": "default", "scopes": ["jobs:read"]}, headers=headers("operator")
    )
    assert response.status_code == 201, response.text
    minted = response.json()
    assert (await _sign_in(browserish, minted["key"])).status_code == 303
    assert (await browserish.get("/ui/")).status_code == 200

    revoked = await browserish.delete(f"/ops/keys/{minted['id']}", headers=headers("operator"))
    assert revoked.status_code == 200

    after = await browserish.get("/ui/")
    assert after.status_code == 303 and after.headers["location"].startswith("/ui/sign-in?next=")


async def test_a_tampered_or_foreign_cookie_is_no_session(browserish: httpx.AsyncClient) -> None:
    signed_in = await _sign_in(browserish, KEYS["writer"][0])
    value = signed_in.cookies[COOKIE]
    for forged in (value[:-2] + ("AA" if not value.endswith("AA") else "BB"), "e30.abc.def", ""):
        browserish.cookies.set(COOKIE, forged)
        response = await browserish.get("/ui/")
        assert response.status_code == 303, forged


async def test_outside_dev_the_cookie_is_secure_and_signed_with_the_configured_secret(settings: Settings) -> None:
    prod = settings.model_copy(update={"env": "prod", "session_secret": SecretStr("s" * 32)})
    async with api_client(prod) as first:
        signed_in = await _sign_in(first, KEYS["reader"][0])
        assert "Secure" in signed_in.headers["set-cookie"]
    # Another process (a replica, or this one restarted) with the same secret takes the same session.
    async with api_client(prod, cookies={COOKIE: signed_in.cookies[COOKIE]}) as second:
        assert (await second.get("/ui/")).status_code == 200
    other = prod.model_copy(update={"session_secret": SecretStr("t" * 32)})
    async with api_client(other, cookies={COOKIE: signed_in.cookies[COOKIE]}) as third:
        assert (await third.get("/ui/")).status_code == 303
