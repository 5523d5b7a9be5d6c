"""The client commands (`submit`, `get`, `list`, `cancel`, `retry`, `watch`, `job-types`): the API over HTTP, with
one-line errors and exit statuses a script can branch on.

Their two settings, APIOPS_URL and APIOPS_API_KEY, are read here, not by `Settings`: they belong to whoever runs
the command, not to the service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from service.cli import console
from service.cli.client import ApiClient, ApiError, Unreachable
from service.settings import Scope

DEFAULT_URL = "http://127.0.0.1:8080"

CLIENT_EPILOG = f"""\
exit status of the client commands (submit, get, list, cancel, retry, watch, job-types, keys): 0 done; 3 the API
refused (its error is printed as one line: status, code, message) or could not be reached; 2 a usage error.
`watch` and `submit --watch`: 0 the job ended success, 1 failed, 2 cancelled, 4 rejected (not approved), 3 the API
refused or could not be reached, 130 interrupted (Ctrl-C; the job goes on).

environment: APIOPS_URL (default {DEFAULT_URL}; the scheme may be left out: localhost:8080) and APIOPS_API_KEY;
--url and --api-key, before or after the command, override them.
"""

CLIENT_COMMANDS = ("submit", "get", "list", "cancel", "retry", "approve", "reject", "watch", "job-types", "keys")
USAGE = 2
API_FAILED = 3
INTERRUPTED = 130
WATCH_EXIT = {"success": 0, "failed": 1, "cancelled": 2, "rejected": 4}


class UsageError(Exception):
    """What the user typed cannot work; the message says why (exit status 2)."""


def base_url(raw: str) -> str:
    """The API's base URL; `localhost:8080` means `http://localhost:8080`."""
    url = raw.strip()
    if "://" not in url:
        url = f"http://{url}"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UsageError(f"bad URL {raw!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UsageError(f"bad URL {raw!r}: expected http://HOST:PORT or https://HOST:PORT")
    return url


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
    as_json = args.output == "json"
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
        return await _list(api, args, as_json)
    if args.command == "keys":
        return await _keys(api, args, as_json)
    if args.command in ("approve", "reject"):
        return await _decide(api, args, as_json)
    if args.command == "job-types":
        types = (await api.job_types())["job_types"]
        _print_json(types) if as_json else console.print_job_types(types, sys.stdout)
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


def key_request(args: argparse.Namespace) -> dict[str, Any]:
    """`keys new`'s options as the body of `POST /ops/keys`; a scope list naming none, or an unknown scope, is a
    usage error before anything is sent."""
    known = [scope.value for scope in Scope]
    scopes = sorted({s.strip() for s in args.scopes.split(",") if s.strip()})
    if not scopes:
        raise UsageError(f"keys new: --scopes names no scope; a key needs at least one of {', '.join(known)}")
    unknown = [s for s in scopes if s not in known]
    if unknown:
        raise UsageError(f"keys new: {unknown[0]!r} is not a scope; scopes are {', '.join(known)}")
    body: dict[str, Any] = {"name": args.name, "team": args.team, "scopes": scopes}
    if args.targets is not None:
        body["targets"] = [p.strip() for p in args.targets.split(",") if p.strip()]
    if args.expires_at is not None:
        body["expires_at"] = args.expires_at
    return body


async def _decide(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    if args.command == "approve":
        job = await api.approve(args.job_id, args.reason)
    else:
        job = await api.reject(args.job_id, args.reason)
    if as_json:
        _print_json(job)
    elif job["status"] == "pending":
        print(f"{job['job_id']}: approved ({job['approvals_given']} of {job['approvals_required']}); it runs now")
    elif job["status"] == "awaiting_approval":
        print(f"{job['job_id']}: approved ({job['approvals_given']} of {job['approvals_required']}); awaits more")
    else:
        print(f"{job['job_id']}: rejected; it will not run")
    return 0


async def _keys(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    if args.keys_command == "new":
        key = await api.create_key(key_request(args))
        if as_json:
            _print_json(key)
        else:
            print(f"API key {key['id']} for {key['name']} of team {key['team']} (shown once; store it now):")
            print(key["key"])
        return 0
    if args.keys_command == "revoke":
        key = await api.revoke_key(args.key_id)
        _print_json(key) if as_json else print(f"{key['id']}: revoked; every API process refuses it from now on")
        return 0
    keys = (await api.keys())["keys"]
    _print_json(keys) if as_json else console.print_keys(keys, sys.stdout)
    return 0


async def _list(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    filters = {"status": args.status, "type": args.type, "actor": args.actor, "target": args.target}
    jobs: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = await api.list(**filters, since=args.since, limit=args.limit, cursor=cursor)
        jobs.extend(page["jobs"])
        cursor = page.get("next_cursor")
        if not args.all or not cursor:
            break
    if not jobs and args.type is not None:
        # The API lists the jobs of any type name, so a typo would list nothing, silently.
        known = sorted(t["name"] for t in (await api.job_types())["job_types"])
        if args.type not in known:
            raise UsageError(f"unknown job type {args.type!r}; known types: {', '.join(known)}")
    if as_json:
        _print_json(jobs)
        return 0
    if not jobs:
        print("apiops: no jobs match", file=sys.stderr)
        return 0
    console.print_jobs(jobs, sys.stdout)
    if cursor:
        print(f"apiops: more jobs match than these {len(jobs)}; --all lists them all", file=sys.stderr)
    return 0


async def _watch(api: ApiClient, job_id: str) -> int:
    status = await console.watch(api, job_id, sys.stdout, live=sys.stdout.isatty())
    return WATCH_EXIT.get(status, API_FAILED)


def client_main(args: argparse.Namespace) -> int:
    """A client command, with its one-line errors: never a traceback for what the API or the network says."""
    try:
        params = parse_params(args.params, args.json) if args.command == "submit" else {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"submit: {exc}") from None
    url = base_url(args.url or os.environ.get("APIOPS_URL") or DEFAULT_URL)
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
    except KeyboardInterrupt:
        watching = args.command == "watch" or getattr(args, "watch", False)
        print("apiops: interrupted" + ("; the job goes on" if watching else ""), file=sys.stderr)
        return INTERRUPTED
    return API_FAILED


def add_client_parsers(commands: Any, connection: argparse.ArgumentParser) -> None:
    """The client commands' parsers; `connection` holds the options every one of them takes (and the top level
    too, so that they may stand before or after the command)."""

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(  # type: ignore[no-any-return]
            name,
            help=help,
            description=help,
            parents=[connection],
            epilog=CLIENT_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    submit = add("submit", "submit a job and print its id")
    submit.add_argument("type", help="the job type (`apiops job-types` lists them)")
    submit.add_argument("params", nargs="*", metavar="key=value", help="a param; the value is JSON if it parses")
    submit.add_argument("--json", metavar="JSON|@FILE", help="params as a JSON object (@- reads stdin)")
    submit.add_argument("--idempotency-key", metavar="KEY", help="the same key within 24 h returns the same job")
    submit.add_argument("--watch", action="store_true", help="then watch the job until it ends")
    add("get", "show a job and its steps").add_argument("job_id")
    jobs = add("list", "list jobs, newest first")
    jobs.add_argument(
        "--status",
        choices=["awaiting_approval", "pending", "running", "success", "failed", "cancelled", "rejected"],
    )
    jobs.add_argument("--type")
    jobs.add_argument("--actor")
    jobs.add_argument("--target")
    jobs.add_argument("--since", metavar="TIME", help="created at or after TIME (ISO 8601, e.g. 2026-12-01T08:00Z)")
    jobs.add_argument("--limit", type=int, help="jobs per page (1-200; the API's default is 50)")
    jobs.add_argument("--all", action="store_true", help="every page, not just the first")
    add("cancel", "cancel a pending or running job").add_argument("job_id")
    add("retry", "run a failed or cancelled job again from its first unfinished step").add_argument("job_id")
    approve = add("approve", "approve a job of your team awaiting approval (not your own); enough approvals run it")
    approve.add_argument("job_id")
    approve.add_argument("--reason", help="why; recorded in the job's history")
    reject = add("reject", "reject a job awaiting approval: it never runs")
    reject.add_argument("job_id")
    reject.add_argument("--reason", required=True, help="why; recorded in the job's history and its error")
    add("watch", "show a job's steps live until it ends; the exit status says how it ended").add_argument("job_id")
    add("job-types", "list the job types with their steps and params")
    keys = add("keys", "API keys managed at run time (scope admin)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)

    def add_key(name: str, help: str) -> argparse.ArgumentParser:
        return key_commands.add_parser(name, help=help, description=help, parents=[connection])

    new_key = add_key("new", "mint a key through the API and print it, once")
    new_key.add_argument("name", help="who uses the key; becomes the actor of the jobs it creates")
    new_key.add_argument("--scopes", default="jobs:read,jobs:write", help="comma-separated (default: %(default)s)")
    new_key.add_argument("--team", default="default", help="whose jobs it sees and acts on (default: %(default)s)")
    new_key.add_argument("--targets", help="comma-separated globs of the targets it may act on (default: any)")
    new_key.add_argument("--expires-at", metavar="TIME", help="refused from TIME on (ISO 8601; default: never)")
    new_key.add_argument(
        "--offline",
        action="store_true",
        help="ask no API: print the key and the entry to add to APIOPS_API_KEYS (to bootstrap the first keys)",
    )
    add_key("list", "every managed key, newest first: never the key itself")
    add_key("revoke", "revoke a key: every API process refuses it at once").add_argument("key_id")
