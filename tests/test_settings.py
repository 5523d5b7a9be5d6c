"""Settings come from APIOPS_* variables; a bad or unsafe configuration is refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Scope, Settings, hash_key


def test_prod_without_any_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIOPS_ENV", "prod")

    with pytest.raises(ValidationError, match="APIOPS_ENV=prod needs at least one API key"):
        Settings()


def test_keys_come_from_the_variable_and_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([{"name": "ci", "sha256": hash_key("b"), "scopes": ["jobs:admin"]}]))
    monkeypatch.setenv("APIOPS_ENV", "prod")
    monkeypatch.setenv(
        "APIOPS_API_KEYS", json.dumps([{"name": "ops", "sha256": hash_key("a"), "scopes": ["jobs:read"]}])
    )
    monkeypatch.setenv("APIOPS_API_KEYS_FILE", str(keys_file))

    settings = Settings()

    assert [(k.name, set(k.scopes)) for k in settings.api_keys] == [("ops", {Scope.READ}), ("ci", {Scope.ADMIN})]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{", "APIOPS_API_KEYS is not valid JSON"),
        ('{"name": "x"}', "APIOPS_API_KEYS must be a JSON list"),
        ('[{"name": "x", "sha256": "abc", "scopes": ["jobs:read"]}]', "String should match pattern"),
        (f'[{{"name": "x", "sha256": "{"0" * 64}", "scopes": ["jobs:everything"]}}]', "jobs:read"),
    ],
)
def test_malformed_keys_are_refused(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("APIOPS_API_KEYS", value)

    with pytest.raises(ValidationError, match=message):
        Settings()


def test_missing_keys_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("APIOPS_API_KEYS_FILE", str(tmp_path / "nope.json"))

    with pytest.raises(ValidationError, match="nope.json: No such file"):
        Settings()


def test_trusted_proxies_accept_a_comma_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIOPS_TRUSTED_PROXIES", "10.0.0.1, 192.168.0.0/16")
    assert [str(n) for n in Settings().trusted_proxies] == ["10.0.0.1/32", "192.168.0.0/16"]

    monkeypatch.setenv("APIOPS_TRUSTED_PROXIES", '["::1"]')
    assert [str(n) for n in Settings().trusted_proxies] == ["::1/128"]

    monkeypatch.setenv("APIOPS_TRUSTED_PROXIES", "not-an-ip")
    with pytest.raises(ValidationError):
        Settings()
