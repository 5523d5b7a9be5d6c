"""The console's pages and forms, under `/ui/`: sign in and out, the jobs list (and the rows its script refreshes),
a job and its actions, the submit forms, and the workers and health page."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from service.api import actions
from service.api.approvals import Approve, Reject
from service.api.auth import caller_of
from service.api.console import present
from service.api.console.web import ASSETS, PREFIX, SECURITY_HEADERS, Viewer, first, form_of, page, render
from service.api.listing import (
    ListFilter,
    Statuses,
    TimeFilter,
    count_by_status,
    jobs_by_id,
    last_event_id,
    list_jobs,
)  # fmt: skip
from service.api.metrics import queue_depth
from service.api.repository import get_events, get_job
from service.api.request_body import query_of, validate
from service.api.routes.health import readiness
from service.api.routes.workers import visible_workers
from service.api.session import check_origin
from service.api.state import AppState
from service.errors import InvalidParams, NotFound, ServiceError, Unauthorized
from service.models import JobStatus
from service.settings import Scope

# --- signing in and out -------------------------------------------------------------------------------------------


def _next_page(raw: str | None) -> str:
    """Where to go after signing in: a console page only, never another site."""
    if raw and raw.startswith(f"{PREFIX}/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return f"{PREFIX}/"


async def sign_in_form(request: Request) -> Response:
    response = render(request, "sign_in.html", next=_next_page(request.query_params.get("next")), error=None)
    response.headers.update(SECURITY_HEADERS)
    return response


async def sign_in(request: Request) -> Response:
    """Exchange an API key for a session cookie. The page that sent the key must be this console's (there is no
    session yet whose token the form could carry: Origin tells)."""
    state = AppState.of(request)
    form = await form_of(request)
    next_page = _next_page(first(form, "next"))
    key = (first(form, "key") or "").strip()
    try:
        check_origin(request)
        await state.keyring.authenticate(key)  # only checked: each request looks the key up again by its hash
    except ServiceError as exc:
        message = "unknown API key" if isinstance(exc, Unauthorized) and key else exc.message
        response: Response = render(request, "sign_in.html", exc.status_code, next=next_page, error=message)
    else:
        response = RedirectResponse(next_page, status_code=303)
        state.sessions.start(response, hashlib.sha256(key.encode()).digest())
    response.headers.update(SECURITY_HEADERS)
    return response


async def sign_out(request: Request, viewer: Viewer) -> Response:
    response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
    AppState.of(request).sessions.end(response)
    return response


# --- the jobs list ------------------------------------------------------------------------------------------------

PAGE_SIZE = 50


class JobsQuery(BaseModel):
    """The jobs page's URL: its filters (shareable, bookmarkable) and its place in the list."""

    model_config = ConfigDict(extra="ignore")  # a bookmark from an older console still opens

    status: Statuses | None = None
    type: str | None = None
    target: str | None = None
    actor: str | None = None
    since: TimeFilter | None = None
    until: TimeFilter | None = None
    cursor: str | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = PAGE_SIZE

    def params(self, **changes: Any) -> str:
        """This view's query string with `changes` (None removes a parameter)."""
        shown = self.model_dump(include=set(JobsQuery.model_fields), exclude_none=True, mode="json")
        values = {**shown, **changes}
        if values.get("limit") == PAGE_SIZE:
            del values["limit"]
        pairs = [
            (name, item)
            for name, value in values.items()
            if value not in (None, "", [], ())
            for item in (value if isinstance(value, list | tuple) else [value])
        ]
        return urlencode(pairs)

    def url(self, **changes: Any) -> str:
        """This view's URL with `changes`."""
        query = self.params(**changes)
        return f"{PREFIX}/" + (f"?{query}" if query else "")


def _jobs_query(request: Request) -> tuple[JobsQuery, str | None]:
    """The page's query, and what was wrong with it (then the page shows no filter rather than an error page)."""
    raw = {name: value for name, value in query_of(request).items() if value not in ("", [""])}
    try:
        return validate(JobsQuery, raw), None
    except InvalidParams as exc:
        return JobsQuery(), exc.message


async def jobs_page(request: Request, viewer: Viewer) -> Response:
    state = AppState.of(request)
    query, problem = _jobs_query(request)
    filters = viewer.principal.confine(ListFilter.within(query))
    async with state.autocommit.connect() as conn:
        last = await last_event_id(conn)  # before the reads: the stream starts there, nothing falls in between
        if filters is None:
            jobs, next_cursor, counts = [], None, dict.fromkeys(JobStatus, 0)
        else:
            page_ = await list_jobs(conn, filters, query.limit, query.cursor)
            jobs, next_cursor = page_.jobs, page_.next_cursor
            counts = await count_by_status(conn, filters)
    stream = {"after": last, **query.model_dump(include={"type", "target", "actor"}, exclude_none=True)}
    return render(
        request, "jobs.html", viewer=viewer, query=query, problem=problem, jobs=jobs, counts=counts,
        next_cursor=next_cursor, types=sorted(t.name for t in state.registry), statuses=list(JobStatus),
        stream_url=f"/ops/events?{urlencode(stream)}", now=_now(),
        first_page=query.cursor is None, rows_url=f"{PREFIX}/rows?{query.params(cursor=None)}",
    )  # fmt: skip


class RowsQuery(JobsQuery):
    ids: Annotated[str, Field(max_length=20_000)]


async def rows(request: Request, viewer: Viewer) -> Response:
    """The rows of the jobs page for these job ids, as the page's filters show them (a job that no longer matches
    is left out): what the page's script swaps in when events arrive. Plus the counts by status."""
    state = AppState.of(request)
    query = validate(RowsQuery, query_of(request))
    ids = [job_id for job_id in query.ids.split(",") if job_id][:200]
    filters = viewer.principal.confine(ListFilter.within(query))
    jobs, counts = [], dict.fromkeys(JobStatus, 0)
    if filters is not None and ids:
        async with state.autocommit.connect() as conn:
            jobs = await jobs_by_id(conn, ids, filters)
            counts = await count_by_status(conn, filters)
    return render(request, "rows.html", viewer=viewer, query=query, jobs=jobs, counts=counts, now=_now())


def _now() -> datetime:
    return datetime.now(UTC)


# --- a job --------------------------------------------------------------------------------------------------------


async def job_page(request: Request, viewer: Viewer, problem: ServiceError | None = None) -> Response:
    state = AppState.of(request)
    job_id = request.path_params["job_id"]
    only_changes = request.query_params.get("history") == "changes"
    async with state.autocommit.connect() as conn:
        job = await get_job(conn, job_id, team=viewer.principal.team_filter)
        events = await get_events(conn, job_id)
    shown = [event for event in events if present.is_change(event)] if only_changes else events
    mine = job.actor == viewer.principal.name or viewer.may(Scope.ADMIN)
    awaiting = job.status == JobStatus.AWAITING_APPROVAL
    may = {
        "cancel": viewer.may(Scope.WRITE) and mine and not present.is_finished(job),
        "retry": viewer.may(Scope.WRITE) and mine and job.status in (JobStatus.FAILED, JobStatus.CANCELLED),
        # Never one's own: the two-person rule (service.api.approvals) would refuse it.
        "approve": viewer.may(Scope.APPROVE) and awaiting and job.actor != viewer.principal.name,
        "reject": viewer.may(Scope.APPROVE) and awaiting,
    }
    return render(
        request, "job.html", problem.status_code if problem else 200, viewer=viewer, job=job, events=shown,
        all_events=len(events), only_changes=only_changes, may=may, problem=problem, now=_now(),
        last_event=events[-1].event_id if events else 0, params=_pretty(job.params), state=_pretty(job.state),
    )  # fmt: skip


def _pretty(params: dict[str, Any]) -> str:
    return json.dumps(params, indent=2, sort_keys=True)


ACTIONS = ("cancel", "retry", "approve", "reject")
# Actions that cannot be undone ask first: a page of their own without JavaScript, a dialog with it.
DESTRUCTIVE = {"cancel", "reject"}


async def job_action(request: Request, viewer: Viewer) -> Response:
    state = AppState.of(request)
    job_id = request.path_params["job_id"]
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise NotFound(f"no action {action!r}; a job's are {', '.join(ACTIONS)}")
    form = await form_of(request)
    reason = (first(form, "reason") or "").strip() or None
    if action in DESTRUCTIVE and first(form, "confirmed") != "yes":
        async with state.autocommit.connect() as conn:
            job = await get_job(conn, job_id, team=viewer.principal.team_filter)
        return render(request, "confirm.html", viewer=viewer, job=job, action=action)
    caller = caller_of(request, viewer.principal)
    try:
        if action == "cancel":
            await actions.cancel(state, viewer.principal, caller, job_id)
        elif action == "retry":
            await actions.retry(state, viewer.principal, caller, job_id)
        elif action == "approve":
            await actions.approve(state, viewer.principal, caller, job_id, validate(Approve, {"reason": reason}))
        else:
            await actions.reject(state, viewer.principal, caller, job_id, validate(Reject, {"reason": reason}))
    except ServiceError as exc:
        if exc.status_code == 404:
            raise
        return await job_page(request, viewer, problem=exc)  # the job as it is, with why the action was refused
    return RedirectResponse(f"{PREFIX}/jobs/{job_id}", status_code=303)


# --- submitting ---------------------------------------------------------------------------------------------------


async def submit_index(request: Request, viewer: Viewer) -> Response:
    types = sorted(AppState.of(request).registry, key=lambda t: t.name)
    return render(request, "submit_index.html", viewer=viewer, types=types)


async def submit_form(request: Request, viewer: Viewer) -> Response:
    state = AppState.of(request)
    job_type = state.registry.get(request.path_params["type_name"])
    fields = present.form_fields(job_type.params.model_json_schema())
    if request.method == "GET":
        return render(request, "submit.html", viewer=viewer, job_type=job_type, fields=fields, problem=None)
    form = await form_of(request)
    try:
        created = await actions.submit(
            state, viewer.principal, caller_of(request, viewer.principal), job_type.name,
            present.body_of(fields, form), key=None,
        )  # fmt: skip
    except InvalidParams as exc:
        errors = {str(d["field"]).split(".")[0]: d["message"] for d in exc.details or [] if d.get("field")}
        present.fill(fields, form, errors)
        return render(request, "submit.html", 422, viewer=viewer, job_type=job_type, fields=fields, problem=exc)
    return RedirectResponse(f"{PREFIX}/jobs/{created.job.job_id}", status_code=303)


# --- workers and health -------------------------------------------------------------------------------------------


async def workers_page(request: Request, viewer: Viewer) -> Response:
    state = AppState.of(request)
    checks = await readiness(state)
    try:
        workers: list[dict[str, Any]] | None = await visible_workers(state, viewer.principal)
        depth: int | None = await queue_depth(state)
    except Exception:  # Redis is down or slow (DependencyUnavailable, or the depth's own error): the checks say so
        workers = depth = None
    return render(request, "workers.html", viewer=viewer, workers=workers, depth=depth, checks=checks, now=_now())


async def static(request: Request) -> Response:
    return ASSETS.response(request.path_params["version"], request.path_params["name"])


async def console_root(request: Request) -> Response:
    return RedirectResponse(f"{PREFIX}/", status_code=308)


routes = [
    Route(PREFIX, console_root, include_in_schema=False),
    Route(f"{PREFIX}/", page(Scope.READ, jobs_page), include_in_schema=False),
    Route(f"{PREFIX}/rows", page(Scope.READ, rows), include_in_schema=False),
    Route(f"{PREFIX}/sign-in", sign_in_form, methods=["GET"], include_in_schema=False),
    Route(f"{PREFIX}/sign-in", sign_in, methods=["POST"], include_in_schema=False),
    Route(f"{PREFIX}/sign-out", page(Scope.READ, sign_out), methods=["POST"], include_in_schema=False),
    Route(f"{PREFIX}/jobs/{{job_id}}", page(Scope.READ, job_page), include_in_schema=False),
    Route(
        f"{PREFIX}/jobs/{{job_id}}/{{action:str}}",
        page(Scope.READ, job_action),
        methods=["POST"],
        include_in_schema=False,
    ),  # fmt: skip
    Route(f"{PREFIX}/submit", page(Scope.WRITE, submit_index), include_in_schema=False),
    Route(
        f"{PREFIX}/submit/{{type_name}}",
        page(Scope.WRITE, submit_form),
        methods=["GET", "POST"],
        include_in_schema=False,
    ),  # fmt: skip
    Route(f"{PREFIX}/workers", page(Scope.READ, workers_page), include_in_schema=False),
    Route(f"{PREFIX}/static/{{version}}/{{name}}", static, include_in_schema=False),
]
