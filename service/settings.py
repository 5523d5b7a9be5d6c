"""Configuration read from `APIOPS_*` environment variables: the service's own `Settings`, shared by API and worker.

Each job type that is configurable declares its own settings model beside it (`JobType.settings`), derived from
`EnvSettings` so that it reads the same prefix; nothing else in the project reads `os.environ`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import sys
from enum import StrEnum
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Scope(StrEnum):
    READ = "jobs:read"
    WRITE = "jobs:write"
    # Approving or rejecting the team's jobs that await approval (never one's own).
    APPROVE = "jobs:approve"
    # Everything a key of the team may do, on any job of its team (not only the jobs it submitted).
    ADMIN = "jobs:admin"
    # Everything, on every team's jobs: the operators of the service itself.
    SERVICE_ADMIN = "admin"


# A team's name: what a key, and every job it submits, belongs to.
TeamName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")]
DEFAULT_TEAM = "default"
# A glob over a job's target (`*` matches any run of characters, `/` included; `?` one character).
TargetPattern = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


class ApiKeyEntry(BaseModel):
    """One API key as configured: its name (the actor of the jobs it creates), its SHA-256, its scopes, its team and
    the targets it may act on."""

    name: Annotated[str, Field(min_length=1, max_length=100)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    scopes: Annotated[frozenset[Scope], Field(min_length=1)]
    team: TeamName = DEFAULT_TEAM
    # Glob patterns over the targets the key may submit jobs for; None: any target.
    targets: Annotated[tuple[TargetPattern, ...], Field(min_length=1)] | None = None

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class ApprovalPolicy(BaseModel):
    """Which submissions need approvals: of `job_type`, on a target matching one of `targets` (default: any); how
    many approvals, from how many other people; and how long they may take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_type: Annotated[str, Field(min_length=1)]
    targets: Annotated[tuple[TargetPattern, ...], Field(min_length=1)] | None = None
    approvals: Annotated[int, Field(ge=1, le=10)] = 1
    expires_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 4 * 3600.0

    def covers(self, job_type: str, target: str | None) -> bool:
        if job_type != self.job_type:
            return False
        if self.targets is None:
            return True
        return target is not None and any(fnmatchcase(target, pattern) for pattern in self.targets)


def hash_key(key: str) -> str:
    """How a key is stored: its SHA-256, in hex. The key itself is never kept."""
    return hashlib.sha256(key.encode()).hexdigest()


DEV_API_KEY = "dev-api-key-12345"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def env_list(value: object, info: ValidationInfo) -> object:
    """A list setting (declared `Annotated[tuple[...], NoDecode]`): a JSON list, or the comma-separated form such
    settings usually take. Use as `field_validator(name, mode="before")(env_list)`."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            return _json_list(stripped, f"APIOPS_{str(info.field_name).upper()}")
        return tuple(part.strip() for part in stripped.split(",") if part.strip())
    return value


class EnvSettings(BaseSettings):
    """Read from `APIOPS_<FIELD>` variables; a variable no model knows is ignored. The base of `Settings` and of
    every job type's settings."""

    model_config = SettingsConfigDict(env_prefix="APIOPS_", extra="ignore", frozen=True)


class Settings(EnvSettings):
    """What the service itself needs: database, Redis, keys, the API's and the worker's own knobs."""

    env: Literal["dev", "prod"] = "dev"
    database_url: SecretStr = SecretStr("postgresql+asyncpg://postgres@127.0.0.1:5432/apiops")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    api_keys: Annotated[tuple[ApiKeyEntry, ...], NoDecode] = ()
    api_keys_file: Path | None = None
    trusted_proxies: Annotated[tuple[IpNetwork, ...], NoDecode] = ()
    approval_policies: Annotated[tuple[ApprovalPolicy, ...], NoDecode] = ()
    approval_policies_file: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # `text` for people, `json` (one object per line) for log collectors; unset: text in dev, json in prod.
    log_format: Literal["text", "json"] | None = None

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    max_body_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    # The HTTP server's own bounds (service.api.bounded_http): a request line and headers of at most this many bytes,
    # complete within this many seconds of the connection (or of a kept-alive request's first byte), and at most
    # this many client connections (fewer if the file limit leaves no room for them).
    max_header_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024
    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_connections: Annotated[int, Field(ge=1)] = 1000
    # uvicorn's own: an idle kept-alive connection is closed after this; connections the kernel holds unaccepted.
    keep_alive_s: Annotated[int, Field(ge=1)] = 5
    backlog: Annotated[int, Field(ge=1)] = 2048

    queue_name: str = "apiops:queue"
    db_connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    db_command_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    db_pool_size: Annotated[int, Field(ge=1)] = 10
    readiness_timeout_s: Annotated[float, Field(gt=0)] = 1.0
    # A live event stream sends a comment this often when nothing happens, so proxies keep it open.
    sse_keepalive_s: Annotated[float, Field(gt=0)] = 15.0
    enqueue_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    # The console's session cookies are signed with this (the API in prod requires it) and last this long.
    session_secret: Annotated[SecretStr, Field(min_length=32)] | None = None
    session_ttl_s: Annotated[float, Field(ge=60, le=30 * 86400)] = 8 * 3600.0

    worker_max_jobs: Annotated[int, Field(ge=1)] = 20
    worker_poll_delay_s: Annotated[float, Field(gt=0)] = 0.05
    lease_ttl_s: Annotated[float, Field(ge=1)] = 10.0
    # A worker stops a job's step this long before its lease could expire (docs/architecture.md: the promise);
    # None: a fifth of the lease TTL.
    lease_margin_s: Annotated[float, Field(gt=0)] | None = None
    # A job whose step lost its lease this many times in a row by blocking its worker's event loop, with no step
    # finishing in between, is failed instead of taken over again.
    max_takeovers_without_progress: Annotated[int, Field(ge=1)] = 3
    # On SIGTERM, how long running steps may take to finish before they are cancelled and handed back.
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 20.0
    reaper_interval_s: Annotated[float, Field(gt=0)] = 2.0
    # A pending job older than this is (re-)enqueued: it may never have reached Redis.
    requeue_pending_after_s: Annotated[float, Field(ge=0)] = 2.0
    # A job still due this long after its last delivery gets a new one: that delivery may have gone to a worker
    # that died before claiming it (arq keeps such a delivery's keys for a day).
    redeliver_after_s: Annotated[float, Field(gt=0)] = 30.0
    # Where each worker serves its own /metrics (on `host`); None: not served.
    worker_metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        return _json_list(value, "APIOPS_API_KEYS")

    @field_validator("approval_policies", mode="before")
    @classmethod
    def _parse_policies(cls, value: object) -> object:
        return _json_list(value, "APIOPS_APPROVAL_POLICIES")

    _parse_list = field_validator("trusted_proxies", mode="before")(env_list)

    @model_validator(mode="after")
    def _load_files(self) -> Settings:
        """A list from a file is added to the one from its variable."""
        keys = _list_file(self.api_keys_file, "APIOPS_API_KEYS_FILE", ApiKeyEntry)
        policies = _list_file(self.approval_policies_file, "APIOPS_APPROVAL_POLICIES_FILE", ApprovalPolicy)
        object.__setattr__(self, "api_keys", self.api_keys + keys)
        object.__setattr__(self, "approval_policies", self.approval_policies + policies)
        return self

    def approval_policy(self, job_type: str, target: str | None) -> ApprovalPolicy | None:
        """The policy a submission falls under: of those that cover it, the one asking the most approvals."""
        covering = [p for p in self.approval_policies if p.covers(job_type, target)]
        return max(covering, key=lambda p: (p.approvals, -p.expires_s), default=None)

    @model_validator(mode="after")
    def _prod_needs_keys(self) -> Settings:
        if self.env == "prod" and not self.api_keys:
            raise ValueError(
                "APIOPS_ENV=prod needs at least one API key in APIOPS_API_KEYS or APIOPS_API_KEYS_FILE "
                "(create one with `apiops keys new NAME --scopes jobs:read,jobs:write`)"
            )
        return self

    @model_validator(mode="after")
    def _margin_inside_lease(self) -> Settings:
        if self.lease_margin_s is not None and self.lease_margin_s >= self.lease_ttl_s / 2:
            raise ValueError(
                f"APIOPS_LEASE_MARGIN_S={self.lease_margin_s:g} must be under half of APIOPS_LEASE_TTL_S "
                f"({self.lease_ttl_s:g}): a worker must hold a lease for longer than it keeps in reserve"
            )
        return self

    @property
    def lease_margin(self) -> float:
        """How long before its lease could expire a worker stops acting on a job (APIOPS_LEASE_MARGIN_S)."""
        return self.lease_ttl_s / 5 if self.lease_margin_s is None else self.lease_margin_s

    @property
    def lease_statement_timeout_s(self) -> float:
        """Every lease statement (claim, renew, fenced write) gives up after this: a quarter of the lease, so
        that a renewal that hangs leaves time for another try before the lease could expire."""
        return min(self.lease_ttl_s / 4, self.db_command_timeout_s)

    @property
    def dev_mode(self) -> bool:
        return self.env == "dev"

    @property
    def effective_log_format(self) -> Literal["text", "json"]:
        return self.log_format or ("text" if self.dev_mode else "json")


M = TypeVar("M", bound=BaseModel)


def _list_file(path: Path | None, name: str, model: type[M]) -> tuple[M, ...]:
    if path is None:
        return ()
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{name} {path}: {exc.strerror}") from exc
    try:
        entries = _json_list(raw, name)
        return tuple(model.model_validate(e) for e in entries) if isinstance(entries, list) else ()
    except ValidationError as exc:
        raise ValueError(f"{name} {path}: {exc}") from exc


def _json_list(value: object, name: str) -> object:
    if not isinstance(value, str):
        return value
    if not value.strip():
        return ()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc.msg} at position {exc.pos}") from exc
    if not isinstance(parsed, list):
        raise ValueError(f"{name} must be a JSON list")
    return parsed


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()


# The exit status of a process whose settings are invalid, as of a usage error.
INVALID_SETTINGS = 2


def describe_invalid(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per invalid setting of `model` (the service's or a job type's): the variable, what is wrong with the
    value, and the fix; for a check across settings, its own message (which names the variables)."""
    lines = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        if not error["loc"]:
            lines.append(message)
            continue
        name = str(error["loc"][0])
        field = model.model_fields.get(name)
        default = f" (default: {field.default})" if field is not None and field.default is not None else ""
        given = error.get("input")
        shown = f"={given!r}" if isinstance(given, str | int | float) else ""
        lines.append(f"APIOPS_{name.upper()}{shown}: {message}; set it right or unset it{default}")
    return lines


def settings_or_exit(prog: str) -> Settings:
    """The process's settings; if any is invalid, one line per problem on stderr (`prog: ...`) and exit 2: an
    operator reads which variable to fix, not a pydantic traceback."""
    try:
        return get_settings()
    except ValidationError as exc:
        for line in describe_invalid(exc, Settings):
            print(f"{prog}: {line}", file=sys.stderr)
        raise SystemExit(INVALID_SETTINGS) from None
