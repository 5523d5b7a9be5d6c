"""The `apiops` command: run the service, prepare its database, mint API keys, and use the API.

apiops run                 API on APIOPS_HOST:APIOPS_PORT and one worker, in the foreground, until Ctrl-C
apiops serve               the API alone (uvicorn)
apiops db upgrade          create the database if it is missing, then migrate it to the latest revision
apiops keys new NAME --scopes jobs:read,jobs:write
apiops submit TYPE key=value ... [--watch]; get ID; list; cancel ID; retry ID; watch ID
                           the API's client (service/cli/client.py), at APIOPS_URL with APIOPS_API_KEY

The client's two settings are read here, not by `Settings`: they belong to whoever runs the command, not to the
service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from service.cli import console
from service.cli.client import ApiClient, ApiError, Unreachable
from service.settings import Scope, Settings, get_settings, hash_key

# asyncpg, SQLAlchemy and service.api.auth (which brings the server's stack) are imported where they are used: the
# client commands, which need none of them, then start in half the time.

# The project's alembic.ini (its `script_location` is relative to it): service/cli/main.py -> the project's root.
ALEMBIC_INI = Path(__file__).resolve().parents[2] / "alembic.ini"

# The worker's own grace period plus time to hand its jobs back.
STOP_EXTRA_S = 10.0


def _serve_command(settings: Settings) -> list[str]:
    # The service decides itself which forwarded addresses to believe (APIOPS_TRUSTED_PROXIES).
    return [
        sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app",
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
    import asyncpg
    from sqlalchemy.engine import make_url

    from service.db import asyncpg_dsn

    database_url = settings.database_url.get_secret_value()
    url = make_url(database_url)
    maintenance = await asyncpg.connect(asyncpg_dsn(database_url, "postgres"), timeout=settings.db_connect_timeout_s)
    try:
        exists = await maintenance.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", url.database)
        if not exists:
            await maintenance.execute(f'CREATE DATABASE "{url.database}"')
            print(f"apiops: created database {url.database}", file=sys.stderr)
    finally:
        await maintenance.close()


def db_upgrade(settings: Settings) -> int:
    import asyncpg
    from alembic.config import Config
    from sqlalchemy.engine import make_url

    from alembic import command

    try:
        asyncio.run(_create_database(settings))
    except (OSError, asyncpg.PostgresError) as exc:
        url = make_url(settings.database_url.get_secret_value())
        print(f"apiops: cannot reach PostgreSQL at {url.host}:{url.port or 5432}: {exc}", file=sys.stderr)
        return 1
    config = Config(str(ALEMBIC_INI))
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


DEFAULT_URL = "http://127.0.0.1:8080"

CLIENT_EPILOG = f"""\
exit status of the client commands (submit, get, list, cancel, retry, watch): 0 done; 3 the API refused (its
error is printed as one line: status, code, message) or could not be reached; 2 a usage error.
`watch` and `submit --watch`: 0 the job ended success, 1 failed, 2 cancelled, 3 the API refused or could not be
reached, 130 interrupted (Ctrl-C; the job goes on).

environment: APIOPS_URL (default {DEFAULT_URL}) and APIOPS_API_KEY; --url and --api-key override them.
"""

API_FAILED = 3
INTERRUPTED = 130
WATCH_EXIT = {"success": 0, "failed": 1, "cancelled": 2}


def parse_params(pairs: Sequence[str], raw_json: str | None) -> dict[str, Any]:
    """`--json` (inline, `@file` or `@-`), then each `key=value` on top; a value is JSON if it parses as JSON
    (`5`, `true`, `0.5`, `null`, `[1,2]`), a string otherwise (`db/x`)."""
    params: dict[str, Any] = {}
    if raw_json is not None:
        if raw_json.startswith("@"):
            source = raw_json[1:]
            raw_json = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        loaded = json.loads(raw_json)
        if not isinstance(loaded, dict):
            raise ValueError("--json must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not key=value")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


async def _client_command(api: ApiClient, args: argparse.Namespace, params: dict[str, Any]) -> int:
    as_json = getattr(args, "output", "text") == "json"
    if args.command == "submit":
        job = await api.submit(args.type, params, args.idempotency_key)
        _print_json(job) if as_json else print(job["job_id"], flush=True)
        if not args.watch:
            return 0
        return await _watch(api, job["job_id"])
    if args.command == "watch":
        return await _watch(api, args.job_id)
    if args.command == "get":
        job = await api.get(args.job_id)
        _print_json(job) if as_json else console.print_job(job, sys.stdout)
        return 0
    if args.command == "list":
        jobs = await _list(api, args)
        _print_json(jobs) if as_json else console.print_jobs(jobs, sys.stdout)
        return 0
    job = await (api.cancel(args.job_id) if args.command == "cancel" else api.retry(args.job_id))
    if as_json:
        _print_json(job)
    elif args.command == "retry":
        print(f"{job['job_id']}: {job['status']} again, from its first unfinished step")
    elif job["status"] == "cancelled":
        print(f"{job['job_id']}: cancelled")
    else:
        print(f"{job['job_id']}: cancel requested; the running step stops within a second")
    return 0


async def _list(api: ApiClient, args: argparse.Namespace) -> list[dict[str, Any]]:
    filters = {"status": args.status, "type": args.type, "actor": args.actor, "target": args.target}
    jobs: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = await api.list(**filters, limit=args.limit, cursor=cursor)
        jobs.extend(page["jobs"])
        cursor = page.get("next_cursor")
        if not args.all or not cursor:
            return jobs


async def _watch(api: ApiClient, job_id: str) -> int:
    status = await console.watch(api, job_id, sys.stdout, live=sys.stdout.isatty())
    return WATCH_EXIT.get(status, API_FAILED)


def client_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """A client command, with its one-line errors: never a traceback for what the API or the network says."""
    try:
        params = parse_params(args.params, args.json) if args.command == "submit" else {}
    except (OSError, ValueError) as exc:
        parser.error(f"submit: {exc}")
    url = args.url or os.environ.get("APIOPS_URL") or DEFAULT_URL
    api_key = args.api_key or os.environ.get("APIOPS_API_KEY")

    async def go() -> int:
        async with ApiClient(url, api_key) as api:
            return await _client_command(api, args, params)

    try:
        return asyncio.run(go())
    except ApiError as exc:
        hint = " (set APIOPS_API_KEY or --api-key)" if exc.status == 401 and not api_key else ""
        print(f"apiops: {exc}{hint}", file=sys.stderr)
    except Unreachable as exc:
        print(f"apiops: {exc}", file=sys.stderr)
    except httpx.InvalidURL as exc:
        print(f"apiops: bad URL {url!r}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        watching = args.command == "watch" or getattr(args, "watch", False)
        print("apiops: interrupted" + ("; the job goes on" if watching else ""), file=sys.stderr)
        return INTERRUPTED
    return API_FAILED


def _client_parsers(commands: Any) -> None:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", help=f"the API (default: $APIOPS_URL or {DEFAULT_URL})")
    connection.add_argument("--api-key", help="the key to send (default: $APIOPS_API_KEY)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--output", "-o", choices=["text", "json"], default="text", help="default: %(default)s")

    def add(name: str, help: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return commands.add_parser(  # type: ignore[no-any-return]
            name,
            help=help,
            description=help,
            parents=[connection, *parents],
            epilog=CLIENT_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    submit = add("submit", "submit a job and print its id", output)
    submit.add_argument("type", help="the job type (GET /ops/job-types lists them)")
    submit.add_argument("params", nargs="*", metavar="key=value", help="a param; the value is JSON if it parses")
    submit.add_argument("--json", metavar="JSON|@FILE", help="params as a JSON object (@- reads stdin)")
    submit.add_argument("--idempotency-key", metavar="KEY", help="the same key within 24 h returns the same job")
    submit.add_argument("--watch", action="store_true", help="then watch the job until it ends")
    add("get", "show a job and its steps", output).add_argument("job_id")
    jobs = add("list", "list jobs, newest first", output)
    jobs.add_argument("--status", choices=["pending", "running", "success", "failed", "cancelled"])
    jobs.add_argument("--type")
    jobs.add_argument("--actor")
    jobs.add_argument("--target")
    jobs.add_argument("--limit", type=int, help="jobs per page (1-200; the API's default is 50)")
    jobs.add_argument("--all", action="store_true", help="every page, not just the first")
    add("cancel", "cancel a pending or running job", output).add_argument("job_id")
    add("retry", "run a failed or cancelled job again from its first unfinished step", output).add_argument("job_id")
    watch = add("watch", "show a job's steps live until it ends; the exit status says how it ended")
    watch.add_argument("job_id")


CLIENT_COMMANDS = ("submit", "get", "list", "cancel", "retry", "watch")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="apiops",
        description="ApiOps: operational jobs over HTTP.",
        epilog=CLIENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the API and a worker in the foreground")
    commands.add_parser("serve", help="run the API alone")
    db = commands.add_parser("db", help="database administration").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="create the database if missing and migrate it to the latest revision")
    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    new_key = keys.add_parser("new", help="mint a key and print its configuration entry")
    new_key.add_argument("name", help="who uses the key; becomes the actor of the jobs it creates")
    new_key.add_argument("--scopes", default="jobs:read,jobs:write", help="comma-separated (default: %(default)s)")
    _client_parsers(commands)
    args = parser.parse_args(argv)

    if args.command in CLIENT_COMMANDS:
        return client_main(args, parser)
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
