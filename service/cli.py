"""The `apiops` command: run the service, prepare its database, mint API keys.

apiops run                 API on APIOPS_HOST:APIOPS_PORT and one worker, in the foreground, until Ctrl-C
apiops serve               the API alone (uvicorn)
apiops db upgrade          create the database if it is missing, then migrate it to the latest revision
apiops keys new NAME --scopes jobs:read,jobs:write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from service.auth import hash_key
from service.settings import Scope, Settings, get_settings

# The worker's own grace period plus time to hand its jobs back.
STOP_EXTRA_S = 10.0


def _serve_command(settings: Settings) -> list[str]:
    # The service decides itself which forwarded addresses to believe (APIOPS_TRUSTED_PROXIES).
    return [
        sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
        "--host", settings.host, "--port", str(settings.port), "--no-proxy-headers", "--no-access-log",
    ]  # fmt: skip


def _worker_command() -> list[str]:
    return [sys.executable, "-m", "arq", "jobs.worker.WorkerSettings"]


def run(settings: Settings) -> int:
    """Both processes in the foreground; Ctrl-C (or SIGTERM) stops both, and so does either one exiting."""
    children = [subprocess.Popen(_serve_command(settings)), subprocess.Popen(_worker_command())]
    print(f"apiops: API on http://{settings.host}:{settings.port} and a worker; Ctrl-C stops both", file=sys.stderr)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
        code = next(child.returncode for child in children if child.returncode is not None)
        print(f"apiops: a process exited with status {code}; stopping the other", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + settings.shutdown_grace_s + STOP_EXTRA_S
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return code


async def _create_database(settings: Settings) -> None:
    url = make_url(settings.database_url.get_secret_value())
    maintenance = await asyncpg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        database="postgres",
        timeout=settings.db_connect_timeout_s,
    )
    try:
        exists = await maintenance.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", url.database)
        if not exists:
            await maintenance.execute(f'CREATE DATABASE "{url.database}"')
            print(f"apiops: created database {url.database}", file=sys.stderr)
    finally:
        await maintenance.close()


def db_upgrade(settings: Settings) -> int:
    from alembic.config import Config

    from alembic import command

    try:
        asyncio.run(_create_database(settings))
    except (OSError, asyncpg.PostgresError) as exc:
        url = make_url(settings.database_url.get_secret_value())
        print(f"apiops: cannot reach PostgreSQL at {url.host}:{url.port or 5432}: {exc}", file=sys.stderr)
        return 1
    config = Config(str(Path(__file__).resolve().parent.parent / "alembic.ini"))
    command.upgrade(config, "head")
    return 0


def keys_new(name: str, scopes: str) -> int:
    try:
        chosen = sorted({Scope(s.strip()) for s in scopes.split(",") if s.strip()})
    except ValueError as exc:
        print(f"apiops: {exc}; scopes are {', '.join(s.value for s in Scope)}", file=sys.stderr)
        return 2
    key = f"apiops_{secrets.token_urlsafe(32)}"
    entry = {"name": name, "sha256": hash_key(key), "scopes": [s.value for s in chosen]}
    print(f"API key for {name} (shown once; store it now): {key}")
    print("Add this entry to the JSON list in APIOPS_API_KEYS or APIOPS_API_KEYS_FILE:")
    print(json.dumps(entry))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apiops", description="ApiOps: operational jobs over HTTP.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the API and a worker in the foreground")
    commands.add_parser("serve", help="run the API alone")
    db = commands.add_parser("db", help="database administration").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="create the database if missing and migrate it to the latest revision")
    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    new_key = keys.add_parser("new", help="mint a key and print its configuration entry")
    new_key.add_argument("name", help="who uses the key; becomes the actor of the jobs it creates")
    new_key.add_argument("--scopes", default="jobs:read,jobs:write", help="comma-separated (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.command == "keys":
        return keys_new(args.name, args.scopes)
    settings = get_settings()
    if args.command == "run":
        return run(settings)
    if args.command == "serve":
        return subprocess.call(_serve_command(settings))
    return db_upgrade(settings)


if __name__ == "__main__":
    sys.exit(main())
