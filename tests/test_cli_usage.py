"""The `apiops` command before it talks to anything: its version, its help, shell completion, usage errors and
invalid settings, each as a person at a terminal (or a pipe) meets them."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from service.settings import ApiKeyEntry, Scope, hash_key
from tests.conftest import free_port

APIOPS = str(Path(sys.executable).with_name("apiops"))


async def run(
    *args: str, stdout: int = asyncio.subprocess.PIPE, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APIOPS_")}
    process = await asyncio.create_subprocess_exec(
        APIOPS, *args, env={**clean, **(env or {})}, stdout=stdout, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, (out or b"").decode(), err.decode()


async def test_bare_apiops_prints_its_help_and_version_prints_the_version() -> None:
    code, out, err = await run()
    assert code == 0 and err == ""
    assert out.startswith("usage: apiops") and "job-types" in out and "completion" in out
    code, out, _ = await run("--version")
    assert code == 0 and out.startswith("apiops ") and out.split()[1][0].isdigit()


async def test_usage_errors_are_one_line_with_exit_2() -> None:
    no_scopes, bad_scope, bad_team, bad_url = await asyncio.gather(
        run("keys", "new", "ci", "--scopes", ""),
        run("keys", "new", "ci", "--scopes", "jobs:root"),
        run("keys", "new", "ci", "--offline", "--team", "Payments Team"),
        run("list", "--url", "ftp://example"),
    )
    for code, out, err in (no_scopes, bad_scope, bad_team, bad_url):
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("apiops: "), err
    assert "names no scope" in no_scopes[2] and "jobs:read" in no_scopes[2]
    assert "'jobs:root'" in bad_scope[2] and "jobs:admin" in bad_scope[2]
    assert bad_team[2].startswith("apiops: keys new: --team: String should match pattern")
    assert "http://HOST:PORT" in bad_url[2]


async def test_keys_new_offline_prints_a_key_and_the_entry_the_service_reads_with_its_team_and_targets() -> None:
    code, out, err = await run(
        "keys", "new", "alice", "--offline", "--team", "payments", "--targets", "k8s/staging/*, k8s/prod/pay-*"
    )
    assert code == 0, err
    key = out.splitlines()[0].rsplit(" ", 1)[1]
    entry = ApiKeyEntry.model_validate_json(out.splitlines()[-1])
    assert (entry.name, entry.team, entry.targets) == ("alice", "payments", ("k8s/staging/*", "k8s/prod/pay-*"))
    assert entry.sha256 == hash_key(key) and entry.scopes == {Scope.READ, Scope.WRITE}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"APIOPS_PORT": "abc"}, "APIOPS_PORT='abc': Input should be a valid integer"),
        ({"APIOPS_ENV": "prod"}, "APIOPS_ENV=prod needs at least one API key"),
        ({"APIOPS_API_KEYS": '{"name": "x"}'}, "APIOPS_API_KEYS must be a JSON list"),
    ],
)
async def test_an_invalid_setting_is_one_line_naming_the_variable_and_exits_2(
    env: dict[str, str], expected: str
) -> None:
    code, out, err = await run("serve", env=env)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("apiops: ") and expected in err, err
    assert "Traceback" not in err and "pydantic" not in err


async def test_an_approval_policy_for_an_unknown_job_type_stops_the_api_in_one_line() -> None:
    policies = '[{"job_type": "pg-rebuid", "targets": ["k8s/prod/*"]}]'  # misspelt: it would never apply
    code, out, err = await run("serve", env={"APIOPS_APPROVAL_POLICIES": policies, "APIOPS_PORT": str(free_port())})
    assert code == 2 and out == "", err
    (line,) = err.splitlines()
    assert "APIOPS_APPROVAL_POLICIES names job type 'pg-rebuid', which this service does not have" in line
    assert "pg-rebuild" in line and "Traceback" not in err


async def test_the_api_in_prod_without_a_session_secret_stops_in_one_line() -> None:
    env = {"APIOPS_ENV": "prod", "APIOPS_API_KEYS": API_KEYS_JSON, "APIOPS_PORT": str(free_port())}
    code, out, err = await run("serve", env=env)
    assert code == 2 and out == "", err
    (line,) = [line for line in err.splitlines() if "APIOPS_SESSION_SECRET" in line]
    assert "APIOPS_ENV=prod needs APIOPS_SESSION_SECRET" in line and "Traceback" not in err


API_KEYS_JSON = '[{"name": "x", "sha256": "' + "0" * 64 + '", "scopes": ["jobs:read"]}]'


async def test_a_broken_pipe_ends_the_command_quietly() -> None:
    # A reader that is already gone, as after `apiops list | head` has read its lines.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        code, _, err = await run("completion", "bash", stdout=write_end)
    finally:
        os.close(write_end)
    assert err == ""
    assert code == 141


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
async def test_bash_completion_completes_the_commands() -> None:
    code, script, _ = await run("completion", "bash")
    assert code == 0
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", script + '\nCOMP_WORDS=(apiops jo); COMP_CWORD=1; _shtab_apiops; echo "${COMPREPLY[@]}"',
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert out.decode().split() == ["job-types"]


async def test_the_worker_too_says_an_invalid_setting_in_one_line_and_exits_2() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APIOPS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arq", "jobs.worker.WorkerSettings",
        env={**clean, "APIOPS_LEASE_TTL_S": "abc"}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    assert process.returncode == 2
    assert err.decode().splitlines() == [
        "worker: APIOPS_LEASE_TTL_S='abc': Input should be a valid number, unable to parse string as a number;"
        " set it right or unset it (default: 10.0)"
    ]


async def test_a_worker_that_cannot_reach_redis_says_so_at_once_and_at_each_retry() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APIOPS_")}
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arq", "jobs.worker.WorkerSettings",
        env={**clean, "APIOPS_REDIS_URL": nobody}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(20):  # the first within a second or so of start-up, then 0.4 s, 0.8 s, ...
            while len(said) < 3:
                line = (await process.stderr.readline()).decode()
                assert line, f"the worker ended; it said {said}"
                if "Redis unreachable" in line:
                    said.append(line)
    finally:
        process.kill()
        await process.wait()
    assert [f"retry {n} of 60" in line for n, line in enumerate(said, start=1)] == [True] * 3, said
