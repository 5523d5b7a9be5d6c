"""A job type's own settings: read from `APIOPS_*` variables once, lazily, or supplied through the registry; the same
instance reaches the params' validation (API and worker), the lifespan and the steps; a bad one stops start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import noop, pg_rebuild
from jobs.pg_rebuild import PgRebuildSettings
from jobs.worker import startup
from service.api.app import create_app
from service.jobtypes import Registry
from service.settings import Settings
from tests import testjobs
from tests.conftest import api_client, headers, running_worker, wait_for_status
from tests.testjobs import GreeterSettings


def test_settings_are_read_from_the_environment_with_the_apiops_prefix_once(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry([noop.JOB, testjobs.GREETER])
    # Read when first needed, not when the registry (or the job type's module) is made.
    monkeypatch.setenv("APIOPS_GREETER_GREETING", "good evening")
    monkeypatch.setenv("APIOPS_GREETER_MAX_NAMES", "7")

    first = registry.settings("greeter")
    monkeypatch.setenv("APIOPS_GREETER_GREETING", "changed later")

    assert first == GreeterSettings(greeter_greeting="good evening", greeter_max_names=7)
    assert registry.settings("greeter") is first
    assert registry.settings("noop") is None


def test_pg_rebuild_settings_keep_their_variable_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("APIOPS_KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.setenv("APIOPS_KUBE_CONTEXTS", "sim, staging")
    monkeypatch.setenv("APIOPS_KUBE_REQUEST_TIMEOUT_S", "3.5")
    monkeypatch.setenv("APIOPS_PG_REBUILD_PROFILE", "cnpg")
    monkeypatch.setenv("APIOPS_PG_REBUILD_POLL_INTERVAL_S", "0.5")
    monkeypatch.setenv("APIOPS_PG_REBUILD_UNSCHEDULABLE_GRACE_S", "5")
    monkeypatch.setenv("APIOPS_PG_REBUILD_PVC_RELEASE_GRACE_S", "6")

    read = Registry([pg_rebuild.JOB]).settings("pg-rebuild")

    assert read == PgRebuildSettings(
        kubeconfig=tmp_path / "kubeconfig",
        kube_contexts=("sim", "staging"),
        kube_request_timeout_s=3.5,
        pg_rebuild_profile="cnpg",
        pg_rebuild_poll_interval_s=0.5,
        pg_rebuild_unschedulable_grace_s=5,
        pg_rebuild_pvc_release_grace_s=6,
    )
    # The service's own settings no longer know them, and ignore them like any other unknown variable.
    assert not hasattr(Settings(), "kube_contexts")


def test_params_that_need_settings_are_not_validated_without_them() -> None:
    with pytest.raises(TypeError, match="these params are validated with GreeterSettings in context"):
        testjobs.GreetParams(names=["ada"])

    params = testjobs.GreetParams.model_validate({"names": ["ada"]}, context={"settings": GreeterSettings()})

    assert params.greeting == "hello"


def test_supplied_settings_must_be_the_job_types_model() -> None:
    with pytest.raises(
        TypeError, match="settings of job type 'greeter' must be GreeterSettings, not PgRebuildSettings"
    ):
        Registry([testjobs.GREETER]).with_settings({"greeter": PgRebuildSettings()})
    with pytest.raises(TypeError, match="'noop' must be None: it declares no settings"):
        Registry([noop.JOB], settings={"noop": GreeterSettings()})


async def test_an_override_reaches_the_params_validation_the_lifespan_and_the_steps(settings: Settings) -> None:
    overrides = GreeterSettings(greeter_greeting="good day", greeter_voice="the override's voice", greeter_max_names=2)
    configured = Registry([testjobs.GREETER], settings={"greeter": overrides})
    async with (
        api_client(settings, configured, headers=headers("writer")) as client,
        running_worker(settings, configured),
    ):
        accepted = await client.post("/ops/jobs/greeter", json={"names": ["ada", "bob"]})
        refused = await client.post("/ops/jobs/greeter", json={"names": ["ada", "bob", "cy"]})
        job = await wait_for_status(client, accepted.json()["job_id"], "success", "failed")

    assert accepted.status_code == 202, accepted.text
    assert job["params"]["greeting"] == "good day"
    assert job["steps"][0]["detail"] == "good day ada, bob, in the override's voice; configured greeting good day"
    assert refused.status_code == 422
    assert "names: Value error, at most 2 names (APIOPS_GREETER_MAX_NAMES)" in refused.json()["error"]["message"]


async def test_the_worker_validates_params_with_its_own_settings(settings: Settings) -> None:
    # The API allows three names; this worker only one, so it refuses the job it is handed.
    lenient = Registry([testjobs.GREETER], settings={"greeter": GreeterSettings(greeter_max_names=3)})
    strict = lenient.with_settings({"greeter": GreeterSettings(greeter_max_names=1)})
    async with api_client(settings, lenient, headers=headers("writer")) as client, running_worker(settings, strict):
        submitted = await client.post("/ops/jobs/greeter", json={"names": ["ada", "bob"]})
        job = await wait_for_status(client, submitted.json()["job_id"], "success", "failed")

    assert job["status"] == "failed"
    assert "this worker cannot run it: ValidationError" in job["error"]
    assert "at most 1 names (APIOPS_GREETER_MAX_NAMES)" in job["error"]


async def test_an_invalid_job_type_setting_stops_the_api_and_the_worker_at_start_up(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each says it in one line naming the variable, and exits as on a usage error (the processes themselves:
    tests/test_settings_processes.py)."""
    monkeypatch.setenv("APIOPS_KUBE_CONTEXTS", "[sim")
    expected = (
        "invalid setting of job type pg-rebuild: APIOPS_KUBE_CONTEXTS='[sim': APIOPS_KUBE_CONTEXTS is not valid"
        " JSON: Expecting value at position 1; set it right or unset it (default: ())"
    )

    with pytest.raises(SystemExit) as api_stopped:
        create_app(settings, Registry([pg_rebuild.JOB]))
    with pytest.raises(SystemExit) as worker_stopped:
        await startup({"settings": settings, "registry": Registry([pg_rebuild.JOB]), "handle_signals": False})

    assert (api_stopped.value.code, worker_stopped.value.code) == (2, 2)
    said = [line for line in capsys.readouterr().err.splitlines() if "invalid setting" in line]
    assert len(said) == 2 and all(line.endswith(expected) for line in said), said
