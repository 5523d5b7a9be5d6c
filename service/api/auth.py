"""Who is calling: the API key (stored only as SHA-256, compared in constant time) and the client's address."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from starlette.requests import Request

from service.errors import Forbidden, Unauthorized
from service.settings import DEV_API_KEY, ApiKeyEntry, IpNetwork, Scope, Settings, hash_key

logger = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes


class KeyRing:
    def __init__(self, entries: Iterable[ApiKeyEntry]) -> None:
        self._entries = [(bytes.fromhex(e.sha256), Principal(e.name, e.scopes)) for e in entries]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        entries = list(settings.api_keys)
        if settings.dev_mode:
            logger.warning(
                "DEVELOPMENT MODE (APIOPS_ENV=dev): the well-known key %r has every scope; never expose this service",
                DEV_API_KEY,
            )
            entries.append(ApiKeyEntry(name="dev", sha256=hash_key(DEV_API_KEY), scopes=frozenset(Scope)))
        return cls(entries)

    def authenticate(self, presented: str | None) -> Principal:
        if not presented:
            raise Unauthorized(f"missing API key; send it in the {API_KEY_HEADER!r} header")
        digest = hashlib.sha256(presented.encode()).digest()
        found: Principal | None = None
        # Compare with every entry, so the time taken says nothing about which (if any) matched.
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        if found is None:
            raise Unauthorized("unknown API key")
        return found


def require(request: Request, scope: Scope) -> Principal:
    """The caller, who must hold `scope` (or `jobs:admin`)."""
    keyring: KeyRing = request.state.app.keyring
    principal = keyring.authenticate(request.headers.get(API_KEY_HEADER))
    if not principal.allows(scope):
        raise Forbidden(f"API key {principal.name!r} lacks the scope {scope.value!r}", details={"scope": scope.value})
    return principal


def identify(request: Request) -> Principal | None:
    """The caller if it presents a valid key, else None: for what anyone may ask but only a keyed caller is told
    in full."""
    keyring: KeyRing = request.state.app.keyring
    try:
        return keyring.authenticate(request.headers.get(API_KEY_HEADER))
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
