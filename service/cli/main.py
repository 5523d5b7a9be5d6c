"""The `apiops` command: run the service, prepare its database, mint API keys, and use the API.

apiops run                 API on APIOPS_HOST:APIOPS_PORT and one worker, in the foreground, until Ctrl-C
apiops serve               the API alone (uvicorn)
apiops db upgrade          create the database if it is missing, then migrate it to the latest revision
apiops keys new NAME --offline --scopes jobs:read,jobs:write --team T   a key for APIOPS_API_KEYS (bootstrap)
apiops submit TYPE key=value ... [--watch]; get ID; list; cancel ID; retry ID; watch ID; job-types;
       keys new NAME --team T; keys list; keys revoke ID
                           the API's client (service/cli/commands.py), at APIOPS_URL with APIOPS_API_KEY
apiops completion bash     a shell completion script (bash, zsh or tcsh)

The service's commands live in service/cli/processes.py, the client's in service/cli/commands.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import version

import shtab

from service.cli import processes
from service.cli.commands import (
    CLIENT_COMMANDS,
    CLIENT_EPILOG,
    USAGE,
    UsageError,
    add_client_parsers,
    client_main,
    key_request,
)
from service.settings import settings_or_exit

# Exit status after a broken pipe (`apiops list | head`), as a shell reports a process that SIGPIPE ended.
BROKEN_PIPE = 141


def _connection_options(suppress: bool) -> argparse.ArgumentParser:
    """The client's options. On the commands their defaults are suppressed, so that a value given before the
    command (`apiops --url X list`) is not overwritten by the command's own default."""
    default = argparse.SUPPRESS if suppress else None
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", default=default, help="the API (default: $APIOPS_URL or http://127.0.0.1:8080)")
    options.add_argument("--api-key", default=default, help="the key to send (default: $APIOPS_API_KEY)")
    options.add_argument(
        "--output", "-o", choices=["text", "json"], default=argparse.SUPPRESS if suppress else "text",
        help="text for people (default) or json for scripts",
    )  # fmt: skip
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apiops",
        description="ApiOps: operational jobs over HTTP.",
        epilog=CLIENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_connection_options(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"apiops {version('apiops')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run the API and a worker in the foreground")
    commands.add_parser("serve", help="run the API alone")
    db = commands.add_parser("db", help="database administration").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="create the database if missing and migrate it to the latest revision")
    add_client_parsers(commands, _connection_options(suppress=True))
    completion = commands.add_parser(
        "completion", help='print a shell completion script: eval "$(apiops completion bash)"'
    )
    completion.add_argument("shell", choices=shtab.SUPPORTED_SHELLS)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "completion":
        print(shtab.complete(parser, shell=args.shell))
        return 0
    if args.command == "keys" and args.keys_command == "new" and args.offline:
        if args.expires_at is not None:
            raise UsageError("keys new: --expires-at needs the API; a key in APIOPS_API_KEYS lasts until removed")
        return processes.keys_new(key_request(args))
    if args.command in CLIENT_COMMANDS:
        return client_main(args)
    settings = settings_or_exit("apiops")
    if args.command == "run":
        return processes.run(settings)
    if args.command == "serve":
        return processes.serve(settings)
    return processes.db_upgrade(settings)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except UsageError as exc:
        print(f"apiops: {exc}", file=sys.stderr)
        return USAGE
    except BrokenPipeError:
        # The reader went away: nothing more to say. Point stdout at /dev/null so that the interpreter's last
        # flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
