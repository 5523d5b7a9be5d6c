"""API keys managed at run time: minted, listed and revoked through `/ops/keys`, stored in PostgreSQL by their
SHA-256 only, and looked up by it.

Each API process caches what it looked up, and drops an entry when PostgreSQL announces that the key was revoked
(the event hub's LISTEN connection; the revoking statement itself sends the notification, so it is delivered when it
commits). While that connection is down nothing is cached, so a revocation is never missed: every replica refuses a
revoked key as soon as the revocation commits, and an expired one from its expiry on.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.repository import Caller, new_id
from service.errors import Conflict, NotFound
from service.settings import Scope, TargetPattern, TeamName

logger = logging.getLogger(__name__)

# What a revocation announces (the key's SHA-256 in hex): every API process drops it from its cache.
CHANNEL = "apiops_keys"
# How long a looked-up key is trusted without asking again, while announcements are heard (an unheard one is
# impossible then: the cache is off while the connection is down); and how many keys a process remembers.
CACHE_TTL_S = 60.0
CACHE_SIZE = 10_000
# A key's last use is written at most this often per process: a write per request would cost more than the request.
TOUCH_EVERY_S = 60.0


def _future(value: datetime | None) -> datetime | None:
    if value is not None and value <= datetime.now(UTC):
        raise ValueError("must be in the future")
    return value


class NewKey(BaseModel):
    """`POST /ops/keys`."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=100, description="the actor of the jobs it submits")]
    team: TeamName
    scopes: Annotated[list[Scope], Field(min_length=1)]
    targets: Annotated[list[TargetPattern], Field(min_length=1)] | None = None
    expires_at: Annotated[datetime | None, AfterValidator(_future)] = None


class KeyOut(BaseModel):
    """A managed key as `GET /ops/keys` shows it: never the key, nor its hash."""

    id: str
    name: str
    team: str
    scopes: list[str]
    targets: list[str] | None
    status: str
    created_at: datetime
    created_by: str
    created_from: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None
    revoked_from: str | None
    last_used_at: datetime | None


class KeyList(BaseModel):
    keys: list[KeyOut]


class MintedKey(KeyOut):
    """The answer to `POST /ops/keys`: the key itself, this once."""

    key: str


@dataclass(frozen=True)
class StoredKey:
    """What authenticating needs of a managed key."""

    key_id: str
    name: str
    team: str
    scopes: frozenset[Scope]
    targets: tuple[str, ...] | None
    expires_at: datetime | None


_COLUMNS = """key_id AS id, name, team, scopes, targets,
    CASE WHEN revoked_at IS NOT NULL THEN 'revoked' WHEN expires_at <= now() THEN 'expired' ELSE 'active' END AS status,
    created_at, created_by, created_from, expires_at, revoked_at, revoked_by, revoked_from, last_used_at"""
_INSERT = text(f"""
INSERT INTO ops_api_key (key_id, name, team, scopes, targets, sha256, created_by, created_from, expires_at)
VALUES (:key_id, :name, :team, :scopes, :targets, :sha256, :actor, :source_ip, :expires_at)
RETURNING {_COLUMNS}
""")
_LIST = text(f"SELECT {_COLUMNS} FROM ops_api_key ORDER BY created_at DESC, key_id DESC")
# Revoke, and announce it to every API process in the same statement: the notification goes out when it commits.
_REVOKE = text(f"""
WITH key AS (SELECT key_id, revoked_at FROM ops_api_key WHERE key_id = :key_id FOR UPDATE),
revoked AS (
    UPDATE ops_api_key SET revoked_at = now(), revoked_by = :actor, revoked_from = :source_ip
    FROM key WHERE ops_api_key.key_id = key.key_id AND key.revoked_at IS NULL
    RETURNING ops_api_key.*
),
announced AS (SELECT encode(sha256, 'hex') AS sha256, pg_notify('{CHANNEL}', encode(sha256, 'hex')) FROM revoked)
SELECT (SELECT sha256 FROM announced) AS announced, (SELECT revoked_at FROM key) AS was_revoked_at,
    EXISTS (SELECT 1 FROM key) AS found
""")
_GET = text(f"SELECT {_COLUMNS} FROM ops_api_key WHERE key_id = :key_id")
_FIND = text("""
SELECT key_id, name, team, scopes, targets, expires_at FROM ops_api_key WHERE sha256 = :sha256 AND revoked_at IS NULL
""")
_TOUCH = text("UPDATE ops_api_key SET last_used_at = now() WHERE key_id = :key_id")


def _key_out(row: Any) -> KeyOut:
    return KeyOut.model_validate(row, from_attributes=True)


class KeyStore:
    """The managed keys of one API process: lookups by hash (cached, see the module's docstring), and the writes of
    `/ops/keys`. `db` is the engine in autocommit: each statement is its own transaction."""

    def __init__(self, db: AsyncEngine) -> None:
        self._db = db
        # sha256 -> (the key, or None for a hash that names no usable key; when it was read, monotonic)
        self._cache: OrderedDict[bytes, tuple[StoredKey | None, float]] = OrderedDict()
        self._touched: dict[str, float] = {}
        # Set by the hub while it hears announcements; until then, and whenever it stops, nothing is cached.
        self.hearing = False

    async def mint(self, new: NewKey, caller: Caller) -> MintedKey:
        key = f"apiops_{secrets.token_urlsafe(32)}"
        values = {
            "key_id": new_id("key"), "name": new.name, "team": new.team,
            "scopes": sorted(s.value for s in new.scopes), "targets": new.targets,
            "sha256": hashlib.sha256(key.encode()).digest(), "expires_at": new.expires_at,
            "actor": caller.actor, "source_ip": caller.source_ip,
        }  # fmt: skip
        async with self._db.connect() as conn:
            row = (await conn.execute(_INSERT, values)).one()
        minted = MintedKey(**_key_out(row).model_dump(), key=key)
        logger.info(
            "API key %s (%s of team %s, scopes %s) created by %s from %s",
            minted.id, minted.name, minted.team, ",".join(minted.scopes), caller.actor, caller.source_ip,
        )  # fmt: skip
        return minted

    async def list(self) -> list[KeyOut]:
        async with self._db.connect() as conn:
            return [_key_out(row) for row in await conn.execute(_LIST)]

    async def revoke(self, key_id: str, caller: Caller) -> KeyOut:
        async with self._db.connect() as conn:
            result = (await conn.execute(_REVOKE, {"key_id": key_id, **_caller(caller)})).one()
            if not result.found:
                raise NotFound(f"no API key {key_id!r}")
            if result.announced is None:
                raise Conflict(
                    f"API key {key_id} was already revoked at {result.was_revoked_at.isoformat()}",
                    details={"revoked_at": result.was_revoked_at.isoformat()},
                )
            row = (await conn.execute(_GET, {"key_id": key_id})).one()
        self.forget(result.announced)  # this process's own next request must not wait for the announcement
        logger.info("API key %s revoked by %s from %s", key_id, caller.actor, caller.source_ip)
        return _key_out(row)

    async def find(self, digest: bytes) -> StoredKey | None:
        """The usable key with this SHA-256: not revoked, not expired; None if there is none."""
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and self.hearing and now - cached[1] < CACHE_TTL_S:
            found = cached[0]
        else:
            async with self._db.connect() as conn:
                row = (await conn.execute(_FIND, {"sha256": digest})).one_or_none()
            found = None if row is None else _stored(row)
            if self.hearing:
                self._cache[digest] = (found, now)
                self._cache.move_to_end(digest)
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        if found is None or (found.expires_at is not None and found.expires_at <= datetime.now(UTC)):
            return None
        if now - self._touched.get(found.key_id, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
            self._touched[found.key_id] = now
            async with self._db.connect() as conn:
                await conn.execute(_TOUCH, {"key_id": found.key_id})
        return found

    def forget(self, sha256_hex: str) -> None:
        """A key was revoked (announced by PostgreSQL): ask again next time."""
        try:
            self._cache.pop(bytes.fromhex(sha256_hex), None)
        except ValueError:
            logger.warning("ignored a key announcement that is not a SHA-256: %r", sha256_hex[:80])

    def hear(self, hearing: bool) -> None:
        """Announcements are heard from now on (True), or may have been missed (False): in both cases what is
        cached may be stale."""
        self.hearing = hearing
        self._cache.clear()


def _stored(row: Any) -> StoredKey:
    return StoredKey(
        key_id=row.key_id,
        name=row.name,
        team=row.team,
        scopes=frozenset(Scope(s) for s in row.scopes),
        targets=tuple(row.targets) if row.targets is not None else None,
        expires_at=row.expires_at,
    )


def _caller(caller: Caller) -> dict[str, Any]:
    return {"actor": caller.actor, "source_ip": caller.source_ip}
