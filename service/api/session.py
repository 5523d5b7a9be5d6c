"""The console's sessions: a signed cookie that stands for the API key a person signed in with.

The cookie holds the key's SHA-256 (never the key itself), a token against cross-site requests, and is signed with
`APIOPS_SESSION_SECRET` and timed: past `APIOPS_SESSION_TTL_S` it is refused. Each request looks the key up again by
its hash, so a revoked key ends its sessions at once, and the console allows exactly what the key allows.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from service.errors import Forbidden
from service.settings import Settings

logger = logging.getLogger(__name__)

COOKIE = "apiops_session"
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class Session:
    key_sha256: bytes
    csrf: str


class Sessions:
    def __init__(self, secret: str, ttl_s: float, secure: bool) -> None:
        self._signer = URLSafeTimedSerializer(secret, salt="apiops.console.session")
        self._ttl_s = int(ttl_s)
        self._secure = secure

    @classmethod
    def from_settings(cls, settings: Settings) -> Sessions:
        secret = settings.session_secret
        if secret is None:  # dev only: prod refuses to start without one (Settings)
            logger.warning("APIOPS_SESSION_SECRET is not set: console sessions end when this process stops")
            return cls(secrets.token_urlsafe(32), settings.session_ttl_s, secure=False)
        return cls(secret.get_secret_value(), settings.session_ttl_s, secure=not settings.dev_mode)

    def start(self, response: Response, key_sha256: bytes) -> None:
        """Sign the key's holder in: the cookie goes with `response`."""
        value = self._signer.dumps({"k": key_sha256.hex(), "c": secrets.token_urlsafe(24)})
        response.set_cookie(
            COOKIE, value, max_age=self._ttl_s, path="/", httponly=True, samesite="strict", secure=self._secure
        )

    def end(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=self._secure)

    def of(self, request: Request) -> Session | None:
        """The request's session, if its cookie is one this service signed and it has not expired."""
        value = request.cookies.get(COOKIE)
        if not value:
            return None
        try:
            data = self._signer.loads(value, max_age=self._ttl_s)
            return Session(bytes.fromhex(data["k"]), str(data["c"]))
        except (BadSignature, KeyError, TypeError, ValueError):
            return None


def check_origin(request: Request) -> None:
    """A state-changing request of the console must come from its own pages: the browser's `Origin` (or, where a
    browser sends none, `Referer`) names this host. SameSite=Strict already keeps the cookie off cross-site
    requests; this holds even where a browser does not, and for the sign-in form, which has no session yet."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    host = request.headers.get("host")
    if origin is None or host is None or urlsplit(origin).netloc != host:
        raise Forbidden("cross-site request refused: the console's forms must be sent from its own pages")


def check_token(session: Session, token: str | None) -> None:
    """A signed-in form carries its session's token: a page of another session (or none) cannot act for this one."""
    if token is None or not hmac.compare_digest(token, session.csrf):
        raise Forbidden("the form has expired or did not come from this console; reload the page and try again")
