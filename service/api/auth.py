"""Who is calling: the API key (stored only as SHA-256, compared in constant time) and the client's address."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from starlette.requests import Request

from service.api.keys import KeyStore
from service.api.listing import ListFilter
from service.api.repository import Caller
from service.errors import Forbidden, Unauthorized
from service.settings import DEFAULT_TEAM, DEV_API_KEY, ApiKeyEntry, IpNetwork, Scope, Settings, hash_key

logger = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
# Requests that change nothing: the only ones a console session may make outside the console's own forms.
SAFE_METHODS = ("GET", "HEAD")


@dataclass(frozen=True)
class Principal:
    """Who calls: the key's name (the actor), its scopes, its team, and the targets it may act on (None: any)."""

    name: str
    scopes: frozenset[Scope]
    team: str = DEFAULT_TEAM
    targets: tuple[str, ...] | None = None

    def allows(self, scope: Scope) -> bool:
        if scope in self.scopes or Scope.SERVICE_ADMIN in self.scopes:
            return True
        # jobs:admin holds every scope over a team's jobs, not the service's own administration.
        return scope != Scope.SERVICE_ADMIN and Scope.ADMIN in self.scopes

    def require(self, scope: Scope) -> None:
        """Refuse unless this key holds `scope` (or one that implies it)."""
        if not self.allows(scope):
            raise Forbidden(f"API key {self.name!r} lacks the scope {scope.value!r}", details={"scope": scope.value})

    @property
    def all_teams(self) -> bool:
        return Scope.SERVICE_ADMIN in self.scopes

    @property
    def team_filter(self) -> str | None:
        """The team every read and write of this caller is confined to, in SQL; None for the service's operators."""
        return None if self.all_teams else self.team

    def confine(self, filters: ListFilter) -> ListFilter | None:
        """`filters` narrowed to the jobs this caller may see; None if they ask for another team's only."""
        team = self.team_filter
        if team is None:
            return filters
        if filters.team not in (None, team):
            return None
        return filters.model_copy(update={"team": team})

    def may_target(self, target: str | None) -> bool:
        """A job with no target acts on nothing shared, so any key may submit it."""
        if self.targets is None or target is None:
            return True
        return any(fnmatchcase(target, pattern) for pattern in self.targets)

    def check_target(self, target: str | None) -> None:
        if not self.may_target(target):
            allowed = ", ".join(repr(p) for p in self.targets or ())
            raise Forbidden(
                f"API key {self.name!r} may not act on target {target!r}; it may act on targets matching {allowed}",
                details={"target": target, "allowed_targets": list(self.targets or ())},
            )


class KeyRing:
    """Every key the API accepts: those configured in the environment (and the development key in dev mode), then
    those managed at run time in PostgreSQL (`store`)."""

    def __init__(self, entries: Iterable[ApiKeyEntry], store: KeyStore | None = None) -> None:
        self._entries = [(bytes.fromhex(e.sha256), Principal(e.name, e.scopes, e.team, e.targets)) for e in entries]
        self._store = store

    @classmethod
    def from_settings(cls, settings: Settings, store: KeyStore | None = None) -> KeyRing:
        entries = list(settings.api_keys)
        if settings.dev_mode:
            logger.warning(
                "DEVELOPMENT MODE (APIOPS_ENV=dev): the well-known key %r has every scope; never expose this service",
                DEV_API_KEY,
            )
            entries.append(ApiKeyEntry(name="dev", sha256=hash_key(DEV_API_KEY), scopes=frozenset(Scope)))
        return cls(entries, store)

    async def authenticate(self, presented: str | None) -> Principal:
        if not presented:
            raise Unauthorized(f"missing API key; send it in the {API_KEY_HEADER!r} header")
        return await self.by_sha256(hashlib.sha256(presented.encode()).digest())

    async def by_sha256(self, digest: bytes) -> Principal:
        """The key whose SHA-256 is `digest` (a console session holds only that)."""
        found: Principal | None = None
        # Compare with every entry, so the time taken says nothing about which (if any) matched.
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        if found is None and self._store is not None:
            managed = await self._store.find(digest)
            if managed is not None:
                found = Principal(managed.name, managed.scopes, managed.team, managed.targets)
        if found is None:
            raise Unauthorized("unknown API key")
        return found


async def require(request: Request, scope: Scope) -> Principal:
    """The caller, who must hold `scope` (or `jobs:admin`, or `admin`): by the key in the header, or for a read
    (GET), by the console's session (its pages' live streams cannot send a header)."""
    keyring: KeyRing = request.state.app.keyring
    presented = request.headers.get(API_KEY_HEADER)
    session = None if presented or request.method not in SAFE_METHODS else request.state.app.sessions.of(request)
    if session is not None:
        principal = await keyring.by_sha256(session.key_sha256)
    else:
        principal = await keyring.authenticate(presented)
    principal.require(scope)
    return principal


async def identify(request: Request) -> Principal | None:
    """The caller if it presents a valid key, else None: for what anyone may ask but only a keyed caller is told
    in full."""
    keyring: KeyRing = request.state.app.keyring
    try:
        return await keyring.authenticate(request.headers.get(API_KEY_HEADER))
    except Unauthorized:
        return None


def client_ip(request: Request, trusted: Sequence[IpNetwork]) -> str | None:
    """The peer's address, unless the peer is a trusted proxy: then the nearest `X-Forwarded-For` hop that is not
    itself trusted. Always an IP address, as `ipaddress` writes it, or None (no peer address, as on a Unix socket):
    the walk through the hops stops at one that is not an address, at the last address a trusted proxy vouched for,
    so whatever a client writes there (`<script>`, 3,000 characters) is never stored."""
    peer = _address(request.client.host) if request.client else None
    if peer is None or not _is_trusted(peer, trusted):
        return None if peer is None else str(peer)
    nearest = peer
    for hop in reversed(request.headers.get("x-forwarded-for", "").split(",")):
        if not hop.strip():
            continue
        address = _address(hop.strip())
        if address is None:
            break
        nearest = address
        if not _is_trusted(address, trusted):
            break
    return str(nearest)


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> IpAddress | None:
    """The address in a hop as proxies write it: bare, `1.2.3.4:port` or `[::1]:port`; None if it is none."""
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_trusted(address: IpAddress, trusted: Sequence[IpNetwork]) -> bool:
    return any(address in network for network in trusted)


def caller_of(request: Request, principal: Principal) -> Caller:
    """Who acts, as the jobs and keys it writes record it."""
    settings: Settings = request.state.app.settings
    source_ip = client_ip(request, settings.trusted_proxies)
    return Caller(principal.name, principal.team, source_ip, all_teams=principal.all_teams)
