"""How the console shows jobs: the current step, durations, the step timeline, which events are changes, and a form
generated from a job type's params JSON Schema (and the JSON body read back from it). Pure functions of what the
repository returns; the templates call them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from service.api.schemas import EventOut, JobOut, StepOut
from service.models import EventKind, JobStatus, StepStatus


def current_step(job: JobOut) -> StepOut | None:
    """The step that runs now, or the one that failed or was cancelled; None before the first and after success."""
    for wanted in (StepStatus.RUNNING, StepStatus.FAILED, StepStatus.CANCELLED):
        for step in job.steps:
            if step.status == wanted:
                return step
    return None


def human_duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def duration(job: JobOut | StepOut, now: datetime) -> str:
    """How long it ran (runs, so far); empty if it has not started."""
    if job.started_at is None:
        return ""
    return human_duration(((job.finished_at or now) - job.started_at).total_seconds())


def when(moment: datetime | None) -> str:
    """A time as the console shows every time: UTC, to the second."""
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def local(moment: datetime | None) -> str:
    """A time as a `datetime-local` input holds it (UTC, no zone)."""
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


# The jobs page's quick time ranges: "created in the last ...".
RANGES = [("hour", 3600), ("24 hours", 86400), ("7 days", 7 * 86400)]


def ago(seconds: float) -> str:
    """The moment `seconds` ago, as a filter's value."""
    return local(datetime.now(UTC) - timedelta(seconds=seconds))


@dataclass(frozen=True)
class Bar:
    """One step on the timeline: where its bar starts and how wide it is, in percent of the job's run."""

    step: StepOut
    x: float
    width: float


def timeline(job: JobOut, now: datetime) -> list[Bar]:
    """The job's started steps as bars over its run (a step that runs now reaches to now)."""
    started = [step for step in job.steps if step.started_at is not None]
    if job.started_at is None or not started:
        return []
    begin = min(job.started_at, *(s.started_at for s in started if s.started_at))
    end = max(job.finished_at or now, *(s.finished_at or now for s in started))
    span = max((end - begin).total_seconds(), 1e-3)
    bars = []
    for step in started:
        assert step.started_at is not None
        x = (step.started_at - begin).total_seconds() / span * 100
        width = ((step.finished_at or now) - step.started_at).total_seconds() / span * 100
        bars.append(Bar(step, round(x, 2), round(max(width, 0.4), 2)))
    return bars


# What changes a job's course: everything but a step's routine progress (a step starting, reporting, succeeding).
_ROUTINE_STEP = {StepStatus.RUNNING, StepStatus.SUCCESS}


def is_change(event: EventOut) -> bool:
    """Whether an event belongs in the "failed or changed only" history."""
    if event.kind == EventKind.PROGRESS:
        return False
    return not (event.kind == EventKind.STEP and event.status in _ROUTINE_STEP)


def is_finished(job: JobOut) -> bool:
    return JobStatus(job.status).finished


@dataclass
class FormField:
    """One input of a submit form, from one property of the params schema."""

    name: str  # the param's own name, as the API, the CLI and the docs spell it, is its label too
    widget: str  # text, number, checkbox, select or json
    required: bool
    description: str = ""
    default: Any = None
    options: list[str] = field(default_factory=list)
    step: str = "any"  # a number input's granularity: "1" for an integer
    pattern: str | None = None
    value: str = ""  # what the form shows (what was sent, after an error)
    checked: bool = False
    error: str | None = None


DRY_RUN = "dry_run"


def form_fields(schema: dict[str, Any]) -> list[FormField]:
    """The form for a params schema: required fields first, then the others in the schema's order; a dry run
    option ahead of everything else, since it is what one should try first."""
    required = set(schema.get("required", []))
    made = [_field(name, spec, name in required) for name, spec in schema.get("properties", {}).items()]
    fields = [f for f in made if f is not None]
    for f in fields:
        if f.name == DRY_RUN and f.widget == "checkbox":
            f.checked = True  # offered first, and ticked: the first run of a form is best one that changes nothing
    return sorted(fields, key=lambda f: (f.name != DRY_RUN, not f.required))


def _field(name: str, spec: dict[str, Any], required: bool) -> FormField | None:
    if "const" in spec:
        return None  # one possible value: nothing to ask
    options = [s for s in spec.get("anyOf", [spec]) if s.get("type") != "null"]
    kind = options[0] if len(options) == 1 else {"type": "json"}
    default = spec.get("default")
    made = FormField(name, "text", required, spec.get("description", ""), default, pattern=kind.get("pattern"))
    if "enum" in kind:
        made.widget, made.options = "select", [str(v) for v in kind["enum"]]
    elif kind.get("type") == "boolean":
        made.widget, made.checked = "checkbox", bool(default)
    elif kind.get("type") in ("integer", "number"):
        made.widget, made.step = "number", "1" if kind["type"] == "integer" else "any"
    elif kind.get("type") != "string":
        made.widget = "json"
    if made.widget != "checkbox" and default is not None:
        made.value = json.dumps(default) if made.widget == "json" else str(default)
    return made


def fill(fields: list[FormField], form: dict[str, list[str]], errors: dict[str, str]) -> None:
    """Show what was sent, and each field's error from the API next to it."""
    for f in fields:
        sent = form.get(f.name, [""])[-1]
        if f.widget == "checkbox":
            f.checked = sent != ""
        else:
            f.value = sent
        f.error = errors.get(f.name)


def body_of(fields: list[FormField], form: dict[str, list[str]]) -> bytes:
    """The JSON params a submitted form stands for. An empty optional field is left out (its default applies); a
    number that is not one is sent as the text it is, so that the API's own message says what is wrong."""
    params: dict[str, Any] = {}
    for f in fields:
        sent = form.get(f.name, [""])[-1]
        if f.widget == "checkbox":
            params[f.name] = sent != ""
            continue
        if sent == "" and not f.required:
            continue
        params[f.name] = _typed(f, sent)
    return json.dumps(params).encode()


def _typed(f: FormField, sent: str) -> Any:
    if f.widget == "number":
        for kind in (int, float):
            try:
                return kind(sent)
            except ValueError:
                continue
    if f.widget == "json":
        try:
            return json.loads(sent)
        except json.JSONDecodeError:
            return sent
    return sent
