"""Settings (the service's and the job types') come from APIOPS_* variables; a bad or unsafe configuration is refused
with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.pg_rebuild import PgRebuildSettings
from jobs.pgkube.settings import KubeSettings
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


def test_kube_contexts_accept_a_comma_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIOPS_KUBE_CONTEXTS", "sim, staging")
    assert KubeSettings().kube_contexts == ("sim", "staging")

    monkeypatch.setenv("APIOPS_KUBE_CONTEXTS", '["prod"]')
    assert KubeSettings().kube_contexts == ("prod",)

    monkeypatch.setenv("APIOPS_KUBE_CONTEXTS", '["prod"')
    with pytest.raises(ValidationError, match="APIOPS_KUBE_CONTEXTS is not valid JSON"):
        KubeSettings()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("APIOPS_PG_REBUILD_PROFILE", "crunchy", "pg_rebuild_profile\n  Input should be 'zalando', 'cnpg', 'patroni'"),
        ("APIOPS_PG_REBUILD_POLL_INTERVAL_S", "0", "pg_rebuild_poll_interval_s\n  Input should be greater than 0"),
        ("APIOPS_KUBE_REQUEST_TIMEOUT_S", "soon", "kube_request_timeout_s\n  Input should be a valid number"),
    ],
)
def test_bad_pg_rebuild_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ValidationError, match=f"for PgRebuildSettings\n{message}"):
        PgRebuildSettings()


def test_the_lease_margin_defaults_to_a_fifth_of_the_lease_and_must_stay_under_half(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APIOPS_LEASE_TTL_S", "10")
    assert Settings().lease_margin == 2.0 and Settings().lease_statement_timeout_s == 2.5
    monkeypatch.setenv("APIOPS_LEASE_MARGIN_S", "5")

    with pytest.raises(
        ValidationError, match=r"APIOPS_LEASE_MARGIN_S=5 must be under half of APIOPS_LEASE_TTL_S \(10\)"
    ):
        Settings()
