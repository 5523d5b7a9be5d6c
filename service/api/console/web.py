"""What every console page shares: templates, the packaged static assets, the security headers, who is signed in,
and the one wrapper that turns a page handler's outcome (or error) into a response."""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from service.api.auth import Principal
from service.api.console import present
from service.api.listing import COUNT_CAP
from service.api.request_body import read_body
from service.api.session import CSRF_FIELD, Session, check_origin, check_token
from service.api.state import AppState
from service.errors import InvalidParams, ServiceError, Unauthorized
from service.models import EventKind
from service.settings import Scope

HERE = Path(__file__).parent
PREFIX = "/ui"

# No inline script or style anywhere (the pages' own script and stylesheet are files), no frames, forms only to this
# service, and connections (the live streams, the row refreshes) only to it.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",  # pages show one person's view of live data
}


class Assets:
    """The console's script, stylesheet and icon, read once from the package. Their URL carries a hash of their
    content, so a browser may keep them for a year: a new release has new URLs."""

    def __init__(self, directory: Path) -> None:
        self.files = {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}
        digest = hashlib.sha256()
        for name, content in self.files.items():
            digest.update(name.encode() + b"\0" + content)
        self.version = digest.hexdigest()[:12]

    def url(self, name: str) -> str:
        assert name in self.files, name
        return f"{PREFIX}/static/{self.version}/{name}"

    def response(self, version: str, name: str) -> Response:
        content = self.files.get(name)
        if content is None:
            return HTMLResponse("no such file", status_code=404, headers=SECURITY_HEADERS)
        # An older version's URL still gets the file, but not for long: it is not what that URL once served.
        cache = "public, max-age=31536000, immutable" if version == self.version else "no-cache"
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        headers = {**SECURITY_HEADERS, "Cache-Control": cache}
        return Response(content, media_type=media_type, headers=headers)


ASSETS = Assets(HERE / "static")
ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every value a job carries is text, whatever it holds
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.globals.update(
    asset=ASSETS.url,
    current_step=present.current_step,
    duration=present.duration,
    when=present.when,
    local=present.local,
    ago=present.ago,
    ranges=present.RANGES,
    timeline=present.timeline,
    is_finished=present.is_finished,
    cap=COUNT_CAP,
    kinds=[kind.value for kind in EventKind],
)
TEMPLATES = Jinja2Templates(env=ENV)


@dataclass(frozen=True)
class Viewer:
    """Who is signed in: the key's principal, and the session (for its form token)."""

    principal: Principal
    session: Session

    def may(self, scope: str) -> bool:
        return self.principal.allows(Scope(scope))


def render(
    request: Request, template: str, status_code: int = 200, viewer: Viewer | None = None, **context: Any
) -> HTMLResponse:
    """A page; `viewer` (None on the sign-in page) fills its header and its forms' tokens."""
    context = {"viewer": viewer, "csrf_field": CSRF_FIELD, **context}
    response = TEMPLATES.TemplateResponse(request, template, context, status_code=status_code)
    assert isinstance(response, HTMLResponse)
    return response


async def form_of(request: Request) -> dict[str, list[str]]:
    """A POSTed form's fields (each with every value it was sent with), read within the API's body limit; read once
    per request (the page wrapper checks its token, the handler reads the rest)."""
    cached: dict[str, list[str]] | None = getattr(request.state, "console_form", None)
    if cached is not None:
        return cached
    body = await read_body(request, AppState.of(request).settings.max_body_bytes)
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=500, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidParams(f"the form could not be read: {exc}") from None
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    request.state.console_form = fields
    return fields


def first(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


PageHandler = Callable[[Request, Viewer], Awaitable[Response]]


def page(scope: Scope, handler: PageHandler) -> Callable[[Request], Awaitable[Response]]:
    """A console page for a signed-in key holding `scope`. Without a session: to the sign-in page, and back here
    after. A POST must come from the console's own pages (Origin and the session's form token). A service error is
    shown as a page of its own, in the words the JSON API would use."""

    async def endpoint(request: Request) -> Response:
        try:
            viewer = await _viewer(request)
            if request.method == "POST":
                check_origin(request)
                check_token(viewer.session, first(await form_of(request), CSRF_FIELD))
            viewer.principal.require(scope)
            response = await handler(request, viewer)
        except Unauthorized:
            # Back to this page once signed in; a form's target is no page to come back to (nor to re-send).
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            if request.method != "GET":
                back = f"{PREFIX}/"
            response = RedirectResponse(f"{PREFIX}/sign-in?next={quote(back, safe='')}", status_code=303)
        except ServiceError as exc:
            viewer_or_none = getattr(request.state, "viewer", None)
            response = render(request, "error.html", exc.status_code, viewer=viewer_or_none, error=exc)
        response.headers.update(SECURITY_HEADERS)
        return response

    return endpoint


async def _viewer(request: Request) -> Viewer:
    state = AppState.of(request)
    session = state.sessions.of(request)
    if session is None:
        raise Unauthorized("not signed in")
    principal = await state.keyring.by_sha256(session.key_sha256)  # a revoked key ends its sessions here
    viewer = Viewer(principal, session)
    request.state.viewer = viewer  # for an error page
    return viewer
