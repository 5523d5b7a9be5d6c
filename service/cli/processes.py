"""The commands that run the service itself: `run` (API and a worker), `serve` (the API), `db upgrade` (create and
migrate the database) and `keys new` (mint an API key). They read the service's `Settings`; the client commands
(`service.cli.commands`) never do."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.logs import configure_logging
from service.settings import ApiKeyEntry, Settings, hash_key

# asyncpg, SQLAlchemy and alembic are imported where they are used: the client commands, which need none of them,
# then start in half the time.

# `apiops run`'s own lines; in the text format they read `... apiops: stopping now`.
logger = logging.getLogger("apiops")

# The project's alembic.ini (its `script_location` is relative to it): service/cli/main.py -> the project's root.
ALEMBIC_INI = Path(__file__).resolve().parents[2] / "alembic.ini"

# The worker's own grace period plus time to hand its jobs back.
STOP_EXTRA_S = 10.0


# uvicorn's HTTP protocol with the service's bounds on request heads and connections.
BOUNDED_HTTP = "service.api.bounded_http:BoundedHttpProtocol"


def _serve_command() -> list[str]:
    return [sys.executable, "-m", "service.cli", "serve"]


def _worker_command() -> list[str]:
    return [sys.executable, "-m", "arq", "jobs.worker.WorkerSettings"]


def serve(settings: Settings) -> int:
    """The API under uvicorn, in this process: a signal sent to `apiops serve` (by a supervisor, a container
    runtime, Ctrl-C) reaches the server itself, also as PID 1 (uvicorn installs its handlers explicitly, and PID 1
    gets no default ones). The first SIGTERM or SIGINT stops it gracefully, a second SIGINT at once."""
    import uvicorn

    # The service decides itself which forwarded addresses to believe (APIOPS_TRUSTED_PROXIES). The HTTP protocol
    # bounds each request head's size and read time, and the connections (named, not imported: the CLI imports no
    # API module).
    config = uvicorn.Config(
        "service.api.app:create_app", factory=True, host=settings.host, port=settings.port,
        proxy_headers=False, access_log=False, log_config=None, http=BOUNDED_HTTP,
        timeout_keep_alive=settings.keep_alive_s, backlog=settings.backlog,
    )  # fmt: skip
    # Until uvicorn installs its own handlers, and again after its graceful stop (when it raises the signal once
    # more for the handlers it found), a stop signal ends the process quietly: exit 0, neither a KeyboardInterrupt
    # traceback nor a death by SIGTERM.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_quietly)
    configure_logging(settings)  # from the first line on, in the configured format
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _die_with_parent() -> None:
    """In a child of `apiops run`, before it runs: the kernel sends it SIGTERM when `apiops run` dies, however it
    dies (SIGKILL included), so that no orphan goes on serving the port or taking jobs. Linux only."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    # A process group of its own: the terminal's Ctrl-C reaches `apiops run` alone, which then asks each child
    # once to stop (a second Ctrl-C: at once). Otherwise each child would get the terminal's SIGINT and then ours.
    die_with_parent = _die_with_parent if sys.platform == "linux" else None
    return subprocess.Popen(command, process_group=0, preexec_fn=die_with_parent)


def run(settings: Settings) -> int:
    """Both processes in the foreground; Ctrl-C (or SIGTERM) stops both gracefully, a second Ctrl-C at once; either
    one exiting stops the other."""
    configure_logging(settings)  # its own lines too, in the format of its children's
    children = [_start(_serve_command()), _start(_worker_command())]
    logger.info("API on http://%s:%d and a worker; Ctrl-C stops both", settings.host, settings.port)
    requests = 0

    def stop(signum: int, frame: object) -> None:
        nonlocal requests
        requests += 1
        if requests == 2:
            logger.warning("stopping now")
        # SIGTERM: a graceful stop for both; the worker stops at once on a second one. The API's graceful stop is
        # already short (its event streams end at once), and uvicorn's "at once" would skip the app's own shutdown.
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    # Explicit handlers: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while not requests and all(child.poll() is None for child in children):
        time.sleep(0.2)
    if not requests:
        code = next(child.returncode for child in children if child.returncode is not None)
        logger.warning("a process exited with status %d; stopping the other", code)
        stop(signal.SIGTERM, None)
    deadline = time.monotonic() + settings.shutdown_grace_s + STOP_EXTRA_S
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return code


class DatabaseMissing(Exception):
    """The database does not exist and the role cannot create it: what to do about it, in one line."""


async def _create_database(settings: Settings) -> None:
    """Create the database named in APIOPS_DATABASE_URL if it is missing. The maintenance database (`postgres`) is
    asked only then, so a role that owns no CREATEDB (the migration role) migrates a database that exists."""
    import asyncpg
    from sqlalchemy.engine import make_url

    from service.db import asyncpg_dsn

    database_url = settings.database_url.get_secret_value()
    url = make_url(database_url)
    try:
        conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=settings.db_connect_timeout_s)
    except asyncpg.InvalidCatalogNameError:
        pass  # missing: create it below
    else:
        await conn.close()
        return
    missing = f"database {url.database} does not exist"
    try:
        maintenance = await asyncpg.connect(
            asyncpg_dsn(database_url, "postgres"), timeout=settings.db_connect_timeout_s
        )
    except asyncpg.PostgresError as exc:
        raise DatabaseMissing(
            f"{missing}, and the maintenance database postgres, from which to create it, refuses role "
            f'{url.username}: {exc}; create it as an administrator: CREATE DATABASE "{url.database}"'
        ) from exc
    try:
        await maintenance.execute(f'CREATE DATABASE "{url.database}"')
        print(f"apiops: created database {url.database}", file=sys.stderr)
    except asyncpg.DuplicateDatabaseError:
        pass  # created meanwhile by another `db upgrade`
    except asyncpg.InsufficientPrivilegeError as exc:
        raise DatabaseMissing(
            f"{missing}, and role {url.username} may not create it (no CREATEDB): create it as an administrator "
            f'(CREATE DATABASE "{url.database}"), '
            "or grant the role CREATEDB"
        ) from exc
    finally:
        await maintenance.close()


def db_upgrade(settings: Settings) -> int:
    import asyncpg
    from alembic.config import Config
    from sqlalchemy.engine import make_url

    from alembic import command

    try:
        asyncio.run(_create_database(settings))
    except DatabaseMissing as exc:
        print(f"apiops: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        url = make_url(settings.database_url.get_secret_value())
        print(f"apiops: cannot reach PostgreSQL at {url.host}:{url.port or 5432}: {exc}", file=sys.stderr)
        return 1
    config = Config(str(ALEMBIC_INI))
    command.upgrade(config, "head")
    return 0


def keys_new(request: dict[str, Any]) -> int:
    """`keys new --offline`: a key and the entry that configures it in APIOPS_API_KEYS, asking no API (for the first
    keys, before any can call `POST /ops/keys`). `request` is what `POST /ops/keys` would take."""
    key = f"apiops_{secrets.token_urlsafe(32)}"
    try:
        entry = ApiKeyEntry(sha256=hash_key(key), **request)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            print(f"apiops: keys new: --{error['loc'][0]}: {error['msg']}", file=sys.stderr)
        return 2
    print(f"API key for {entry.name} (shown once; store it now): {key}")
    print("Add this entry to the JSON list in APIOPS_API_KEYS or APIOPS_API_KEYS_FILE:")
    print(json.dumps(entry.model_dump(mode="json", exclude_none=True) | {"scopes": request["scopes"]}))
    return 0
