"""deploy/Containerfile, checked by what can run here (no image can be built: no container engine, no registry
but PyPI's, Debian's and npm's): every file it copies exists and is all the project needs, its install step is the
project's own, the command is exec form so the server is PID 1, the final stage is the slim base with no build
tools and runs as a numeric non-root user, and the tree it copies migrates on its own."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
BUILD_TOOLS = ("apt-get", "apk ", "gcc", "build-essential", "make ", "pip install", "uv pip")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _copied() -> dict[str, str]:
    """What the build stage copies from the build context (the project's root): source -> destination in /app."""
    copied = {}
    for keyword, rest in _stages()[0]:
        if keyword == "COPY":
            *sources, destination = shlex.split(rest)
            for source in sources:
                copied[source] = source if destination in ("./", ".") else destination.removeprefix("./")
    return copied


def image_user() -> tuple[int, int]:
    """The final stage's USER, which must be numeric: `uid:gid`."""
    (user,) = [rest for keyword, rest in _stages()[-1] if keyword == "USER"]
    uid, gid = user.split(":")
    return int(uid), int(gid)


def test_every_copied_file_exists_and_they_are_all_the_install_and_the_migrations_need() -> None:
    copied = _copied()
    for source in copied:
        assert (ROOT / source).exists(), source
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"], "alembic.ini"}
    needed |= {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    script_location = re.search(r"^script_location = %\(here\)s/(\S+)$", (ROOT / "alembic.ini").read_text(), re.M)
    assert script_location is not None
    needed.add(script_location.group(1))
    assert needed <= set(copied)


def test_the_install_step_is_the_projects_own_without_the_dev_extra() -> None:
    (run,) = [rest for keyword, rest in _stages()[0] if keyword == "RUN" and "pip install" in rest]
    image = shlex.split(run.split("&&")[0])
    makefile = (ROOT / "Makefile").read_text()
    (make,) = [line.strip() for line in makefile.splitlines() if "pip install" in line and "-e" in line]
    project = shlex.split(make)
    assert image[0] == "/opt/apiops/bin/pip" and project[0] == "$(BIN)/pip"
    assert image[1:] == [a.replace("[dev]", "") for a in project[1:] if a != "--quiet"] == ["install", "-e", "."]


def test_the_command_is_exec_form_and_the_final_stage_is_slim_without_build_tools() -> None:
    stages = _stages()
    assert len(stages) == 2
    final = stages[-1]
    (cmd,) = [rest for keyword, rest in final if keyword == "CMD"]
    assert json.loads(cmd) == ["apiops", "serve"]  # exec form: a JSON array, no shell in between
    assert not [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    (base,) = [rest for keyword, rest in instructions() if keyword == "ARG" and rest.startswith("PYTHON_IMAGE=")]
    image = base.removeprefix("PYTHON_IMAGE=")
    assert re.fullmatch(r"python:3\.1[1-9]-slim-\w+", image), image
    assert all(
        rest == "${PYTHON_IMAGE}" or rest == "${PYTHON_IMAGE} AS build" for k, rest in instructions() if k == "FROM"
    )
    for keyword, rest in final:
        if keyword == "RUN":
            assert not any(tool in rest for tool in BUILD_TOOLS), rest
    assert image_user()[0] != 0
    # Only the build's results come in: the virtualenv and the project's tree.
    copies = [rest for keyword, rest in final if keyword == "COPY"]
    assert copies == ["--from=build /opt/apiops /opt/apiops", "--from=build /app /app"]


def test_the_copied_tree_finds_its_migrations_on_its_own(tmp_path: Path) -> None:
    """The image's /app holds only what the Containerfile copies; run from there, the code finds alembic.ini and
    every migration script (the editable install makes /app importable, as the working directory does here)."""
    app = tmp_path / "app"
    app.mkdir()
    for source, destination in _copied().items():
        target = app / destination
        if (ROOT / source).is_dir():
            subprocess.run(["cp", "-r", str(ROOT / source), str(target)], check=True)
        else:
            target.write_bytes((ROOT / source).read_bytes())
    probe = (
        "import service; from service.cli.processes import ALEMBIC_INI; from alembic.config import Config; "
        "from alembic.script import ScriptDirectory; "
        "print(service.__file__); print(ScriptDirectory.from_config(Config(str(ALEMBIC_INI))).get_current_head())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=app, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out[0] == str(app / "service" / "__init__.py")
    heads = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out[1] == heads[1]


@pytest.mark.parametrize("command", [["apiops", "serve"], ["arq", "jobs.worker.WorkerSettings"]])
def test_the_commands_of_image_and_manifests_are_installed_by_the_project(command: list[str]) -> None:
    assert (Path(sys.executable).parent / command[0]).is_file()
