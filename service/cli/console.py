"""What the `apiops` client commands print: a job with its steps, a list of jobs, and the live view of `watch`.

`JobView` is a job's state as its events change it. `watch` shows it two ways: on a terminal, a table redrawn in
place (rich); otherwise one plain line per event (`12.3s step-2 running: sleeping 0.5s`), for logs and pipes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from service.cli.client import ApiClient, JobEvent

FINISHED = ("success", "failed", "cancelled", "rejected")
STEP_DONE = ("success", "failed", "cancelled", "skipped")
STYLES = {
    "awaiting_approval": "bold cyan", "running": "bold yellow", "success": "green", "failed": "bold red",
    "cancelled": "magenta", "rejected": "bold magenta",
}  # fmt: skip


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _seconds(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    return f"{max(0.0, (end - start).total_seconds()):.1f}s"


@dataclass
class StepView:
    name: str
    status: str
    detail: str | None
    started_at: datetime | None
    finished_at: datetime | None

    def elapsed(self, now: datetime) -> str:
        return _seconds(self.started_at, self.finished_at or (now if self.status == "running" else None))


@dataclass
class JobView:
    job_id: str
    type: str
    status: str
    created_at: datetime
    error: str | None
    finished_at: datetime | None = None
    steps: dict[str, StepView] = field(default_factory=dict)
    cancel_requested: bool = False

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> JobView:
        created, finished = datetime.fromisoformat(job["created_at"]), _time(job["finished_at"])
        view = cls(job["job_id"], job["type"], job["status"], created, job["error"], finished)
        for step in job["steps"]:
            times = _time(step["started_at"]), _time(step["finished_at"])
            view.steps[step["name"]] = StepView(step["name"], step["status"], step["detail"], *times)
        return view

    def apply(self, event: JobEvent) -> str:
        """Changes the view as `event` says; returns the event as one plain line."""
        at = f"{max(0.0, (event.created_at - self.created_at).total_seconds()):.1f}s"
        step = self.steps.get(event.step) if event.step else None
        if event.kind == "step" and event.step:
            if step is None:
                step = self.steps[event.step] = StepView(event.step, "pending", None, None, None)
            step.status = event.status or step.status
            if step.status == "running":
                # A step that runs again (retry, another worker) starts afresh.
                step.started_at, step.finished_at, step.detail = event.created_at, None, None
            elif step.status in STEP_DONE:
                step.finished_at = event.created_at
            step.detail = event.detail if event.detail is not None else step.detail
            return f"{at} {event.step} {step.status}" + (f": {event.detail}" if event.detail else "")
        if event.kind == "progress" and event.step:
            if step is not None:
                step.detail = event.detail
            return f"{at} {event.step} running" + (f": {event.detail}" if event.detail else "")
        return f"{at} {self._apply_job_event(event)}"

    def _apply_job_event(self, event: JobEvent) -> str:
        by = f" by {event.actor}" if event.actor else ""
        if event.kind == "finished":
            self.status, self.error, self.finished_at = event.status or self.status, event.detail, event.created_at
            return f"job {self.status}" + (f": {event.detail}" if event.detail else "")
        if event.kind == "cancel_requested":
            self.cancel_requested = True
            return f"cancel requested{by}"
        if event.kind == "retried":
            self.status, self.error, self.finished_at, self.cancel_requested = "pending", None, None, False
            for step in self.steps.values():
                if step.status in ("failed", "cancelled", "running"):
                    step.status, step.finished_at = "pending", None
            return f"job retried{by}"
        if event.kind == "approval_requested":
            self.status = event.status or self.status
            return f"job awaiting approval: {event.detail}"
        if event.kind == "approved":
            self.status = event.status or self.status
            runs = "; it runs now" if self.status == "pending" else ""
            return f"job approved{by}: {event.detail}{runs}"
        if event.kind == "rejected":
            return f"job rejected{by}: {event.detail}"
        if event.kind in ("claimed", "released", "created") and event.status:
            self.status = event.status
        attempt, detail = "", event.detail
        if event.kind == "claimed":
            attempt = f", attempt {event.attempt}" if event.attempt else ""
            # Its detail starts `by <owner>`, which the actor already says; a takeover follows after `; `.
            detail = (detail or "").partition("; ")[2] if (detail or "").startswith("by ") else detail
        return f"job {event.kind}{by}{attempt}" + (f": {detail}" if detail else "")

    def renderable(self, now: datetime | None = None) -> Group:
        """The job as a table of its steps, with the time each has run (still counting while it runs)."""
        now = now or datetime.now(UTC)
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("step", "status", "elapsed", "detail"):
            table.add_column(column, justify="right" if column == "elapsed" else "left")
        for step in self.steps.values():
            status = Text(step.status, style=STYLES.get(step.status, ""))
            table.add_row(step.name, status, step.elapsed(now), step.detail or "")
        finished = self.status in FINISHED
        total = _seconds(self.created_at, self.finished_at if finished else now)
        status = Text(self.status, style=STYLES.get(self.status, ""))
        suffix = (f" in {total}" if finished else f" {total}") if total else ""
        title = Text.assemble((self.job_id, "bold"), f" ({self.type}) ", status, suffix)
        if self.cancel_requested and self.status not in FINISHED:
            title.append(" (cancel requested)", style="magenta")
        parts: list[Any] = [title, table]
        if self.error:
            parts.append(Text(f"error: {self.error}", style="red"))
        return Group(*parts)


async def watch(api: ApiClient, job_id: str, out: TextIO, live: bool) -> str:
    """Shows the job until it finishes; returns its final status.

    The job's history comes with the first GET, so the view starts complete and the stream is read from the
    last event of that history: a job that failed, was retried and now runs has an old `finished` in its
    history, and only a `finished` after the history ends the watch."""
    job = await api.get(job_id, include_events=True)
    view = JobView.from_job(job)
    history = [JobEvent.from_json(e) for e in job.get("events", [])]
    lines = [view.apply(event) for event in history]
    over = _last_is_finished(history)
    last_id = history[-1].event_id if history else None
    if not live:
        _print_lines(out, lines)
        if not over:
            async with aclosing(api.follow(job_id, last_id, notice=_say)) as events:
                async for event in events:
                    _print_lines(out, [view.apply(event)])
        return view.status
    console = Console(file=out)
    with Live(get_renderable=view.renderable, console=console, refresh_per_second=8, transient=False) as screen:

        def above_the_table(message: str) -> None:
            screen.console.print(Text(f"apiops: {message}", style="yellow"))

        if not over:
            async with aclosing(api.follow(job_id, last_id, notice=above_the_table)) as events:
                async for event in events:
                    view.apply(event)
                    screen.refresh()
    return view.status


def _say(message: str) -> None:
    """A notice of the watch itself (the stream lost, back): on stderr, apart from the job's own lines."""
    print(f"apiops: {message}", file=sys.stderr, flush=True)


def _last_is_finished(history: Sequence[JobEvent]) -> bool:
    for event in reversed(history):
        if event.kind in ("finished", "retried"):
            return event.kind == "finished"
    return False


def _print_lines(out: TextIO, lines: Iterable[str]) -> None:
    for line in lines:
        print(line, file=out)
    out.flush()


def print_job(job: dict[str, Any], out: TextIO) -> None:
    """`apiops get`: the job's fields, then its steps."""
    created = datetime.fromisoformat(job["created_at"])
    finished = _time(job["finished_at"])
    fields = [
        ("job", job["job_id"]),
        ("type", job["type"] + (" (dry run: changes nothing)" if _dry_run(job) else "")),
        ("status", job["status"] + (f" in {_seconds(created, finished)}" if finished else "")),
        ("target", job["target"] or "-"),
        ("actor", job["actor"]),
        ("attempt", str(job["attempt"])),
        ("created", _utc(created)),
        ("params", json.dumps(job["params"])),
    ]
    if job.get("approvals_required"):
        until = _utc(datetime.fromisoformat(job["approval_expires_at"]))
        fields.append(("approval", f"{job['approvals_given']} of {job['approvals_required']}, until {until}"))
    if job["error"]:
        fields.append(("error", job["error"]))
    for name, value in fields:
        print(f"{name + ':':<9} {value}", file=out)
    print(file=out)
    rows = [
        [step["name"], step["status"], str(step["attempts"]), _step_time(step), step["detail"] or ""]
        for step in job["steps"]
    ]
    print_columns(out, ["STEP", "STATUS", "ATTEMPTS", "TIME", "DETAIL"], rows)


def _step_time(step: dict[str, Any]) -> str:
    started = _time(step["started_at"])
    return _seconds(started, _time(step["finished_at"]) or (datetime.now(UTC) if started else None))


def print_jobs(jobs: Iterable[dict[str, Any]], out: TextIO) -> None:
    """`apiops list`: one job a line, newest first, as the API returns them."""
    rows = []
    for job in jobs:
        done = sum(1 for step in job["steps"] if step["status"] in ("success", "skipped"))
        created = _utc(datetime.fromisoformat(job["created_at"]))
        steps = f"{done}/{len(job['steps'])}"
        kind = job["type"] + (" (dry run)" if _dry_run(job) else "")
        rows.append([job["job_id"], kind, job["status"], steps, job["actor"], job["target"] or "-", created])
    print_columns(out, ["JOB", "TYPE", "STATUS", "STEPS", "ACTOR", "TARGET", "CREATED"], rows)


def print_keys(keys: Iterable[dict[str, Any]], out: TextIO) -> None:
    """`apiops keys list`: one managed key a line, newest first."""
    rows = [
        [
            key["id"], key["name"], key["team"], ",".join(key["scopes"]), ",".join(key["targets"] or ["*"]),
            key["status"], _utc(datetime.fromisoformat(key["created_at"])),
            _utc(datetime.fromisoformat(key["last_used_at"])) if key["last_used_at"] else "never",
        ]
        for key in keys
    ]  # fmt: skip
    print_columns(out, ["ID", "NAME", "TEAM", "SCOPES", "TARGETS", "STATUS", "CREATED", "LAST USED"], rows)


def print_job_types(job_types: Iterable[dict[str, Any]], out: TextIO) -> None:
    """`apiops job-types`: each type, its params (with their defaults) and its steps."""
    for number, job_type in enumerate(job_types):
        if number:
            print(file=out)
        print(f"{job_type['name']}: {job_type['description']}", file=out)
        schema = job_type["params_schema"]
        required = set(schema.get("required", []))
        for name, spec in schema.get("properties", {}).items():
            default = "required" if name in required else f"default {json.dumps(spec.get('default'))}"
            about = f"; {spec['description']}" if spec.get("description") else ""
            print(f"  param {name} ({default}){about}", file=out)
        print(f"  steps: {', '.join(job_type['steps'])}", file=out)


def _dry_run(job: dict[str, Any]) -> bool:
    return job["params"].get("dry_run") is True


def _utc(moment: datetime) -> str:
    """`2026-12-01 08:00:00Z`: to the second, in UTC, saying so."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def print_columns(out: TextIO, header: list[str], rows: list[list[str]]) -> None:
    """Left-aligned columns, the last one unpadded: readable, and still easy to cut or grep."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)] + [row[-1]]
        print("  ".join(cells).rstrip(), file=out)
