"""From the raw results to figures (service, floor, ratio), pass/fail lines for the targets, one table and a JSON
document."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    service: float
    floor: float | None

    @property
    def ratio(self) -> float | None:
        if self.floor is None or not self.floor or math.isnan(self.floor):
            return None
        return self.service / self.floor


@dataclass(frozen=True)
class Target:
    label: str
    passed: bool
    detail: str


def figures(results: dict[str, Any]) -> list[Figure]:
    s, f = results["service"], results["floor"]
    out = [
        Figure("submit_rate", "submit throughput, concurrency 32", "jobs/s", s["submit"]["rate_per_s"],
               f["submit"]["rate_per_s"]),
        Figure("submit_p50", "submit latency p50, concurrency 32", "ms", s["submit"]["p50_ms"], f["submit"]["p50_ms"]),
        Figure("submit_p99", "submit latency p99, concurrency 32", "ms", s["submit"]["p99_ms"], f["submit"]["p99_ms"]),
        Figure("pickup_idle_p50", "pickup p50, idle", "ms", s["pickup_idle"]["p50_ms"], f["pickup_idle"]["p50_ms"]),
        Figure("pickup_idle_p99", "pickup p99, idle", "ms", s["pickup_idle"]["p99_ms"], f["pickup_idle"]["p99_ms"]),
    ]  # fmt: skip
    rate = s["pickup_load"]["rate_per_s"]
    for q in ("p50", "p99"):
        out.append(
            Figure(f"pickup_load_{q}", f"pickup {q}, {rate:g} jobs/s, 2 workers", "ms",
                   s["pickup_load"][f"{q}_ms"], f["pickup_load"][f"{q}_ms"])
        )  # fmt: skip
    repeats = results["sizes"]["batch_repeats"]
    median = f", median of {repeats}" if repeats > 1 else ""
    for workers in (1, 2):
        key = f"end_to_end_{workers}w"
        out.append(
            Figure(f"jobs_per_s_{workers}w", f"2-step jobs end to end, {workers} worker{'s' * (workers > 1)}{median}",
                   "jobs/s", s[key]["jobs_per_s"], f[key]["jobs_per_s"])
        )  # fmt: skip
    for q in ("p50", "p99"):
        out.append(
            Figure(f"read_{q}", f"GET /ops/jobs/{{id}} {q} at {results['sizes']['read_rate']:g}/s", "ms",
                   s["read"][f"{q}_ms"], f["read"][f"{q}_ms"])
        )  # fmt: skip
    rows = results["seed"]["rows"]
    for index, (name, stats) in enumerate(s["lists"].items()):
        for q in ("p50", "p99"):
            out.append(
                Figure(f"list_{index}_{q}", f"GET /ops/jobs {name} {q}, {rows:,} jobs", "ms",
                       stats[f"{q}_ms"], f["lists"][name][f"{q}_ms"])
            )  # fmt: skip
    for index, (name, stats) in enumerate(s["console"].items()):
        out.append(
            Figure(f"console_{index}_p99", f"console jobs page ({name}) p99, {rows:,} jobs", "ms",
                   stats["p99_ms"], None)
        )  # fmt: skip
    memory = s["memory"]
    first, last = memory["jobs"]
    out += [
        Figure("api_peak_mb", f"API peak RSS after {last:,} jobs", "MB", memory["api_peak_mb"], None),
        Figure("worker_peak_mb", f"worker peak RSS after {last:,} jobs", "MB", memory["worker_peak_mb"],
               f["memory"]["worker_peak_mb"]),
        Figure("api_growth_pct", f"API RSS growth {first:,} -> {last:,} jobs", "%", memory["api_growth_pct"], None),
        Figure("worker_growth_pct", f"worker RSS growth {first:,} -> {last:,} jobs", "%",
               memory["worker_growth_pct"], None),
    ]  # fmt: skip
    return out


def targets(found: list[Figure]) -> list[Target]:
    by = {figure.key: figure for figure in found}
    out: list[Target] = []

    def at_least_of_floor(key: str, share: float) -> None:
        figure = by[key]
        ratio = figure.ratio or 0.0
        out.append(
            Target(
                f"{figure.label} >= {share:.0%} of the floor",
                ratio >= share,
                f"{figure.service:g} vs {figure.floor:g} {figure.unit} = {ratio:.0%}",
            )
        )

    def at_most(key: str, limit: float) -> None:
        figure = by[key]
        out.append(Target(f"{figure.label} <= {limit:g} {figure.unit}", figure.service <= limit, f"{figure.service:g}"))

    at_least_of_floor("jobs_per_s_1w", 0.7)
    at_least_of_floor("jobs_per_s_2w", 0.7)
    at_least_of_floor("submit_rate", 0.5)
    at_most("pickup_idle_p50", 50)
    at_most("pickup_idle_p99", 150)
    at_most("read_p99", 10)
    for index in range(4):
        at_most(f"list_{index}_p99", 20)
    for first, deep, which in ((0, 1, ""), (2, 3, ", status=failed")):
        a, b = by[f"list_{first}_p50"], by[f"list_{deep}_p50"]
        out.append(
            Target(
                f"GET /ops/jobs deep page p50 <= 1.5x the first page's{which}",
                b.service <= 1.5 * a.service,
                f"{b.service:g} vs {a.service:g} ms = {b.service / a.service:.2f}x",
            )
        )
    for index in range(4):
        at_most(f"console_{index}_p99", 50)
    at_most("api_peak_mb", 120)
    at_most("worker_peak_mb", 150)
    for key in ("api_growth_pct", "worker_growth_pct"):
        figure = by[key]
        out.append(Target(f"{figure.label} < 10%", figure.service < 10, f"{figure.service:g}%"))
    return out


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"


def print_report(found: list[Figure], checked: list[Target], console: Console) -> None:
    table = Table(title="apiops benchmark: the service against the floor (raw asyncpg + arq)")
    table.add_column("figure")
    table.add_column("unit")
    table.add_column("service", justify="right")
    table.add_column("floor", justify="right")
    table.add_column("service/floor", justify="right")
    for figure in found:
        ratio = figure.ratio
        table.add_row(
            figure.label, figure.unit, _number(figure.service), _number(figure.floor), f"{ratio:.2f}" if ratio else "-"
        )
    console.print(table)
    for target in checked:
        mark = "[green]PASS[/green]" if target.passed else "[red]FAIL[/red]"
        console.print(f"{mark} {target.label}: {target.detail}", highlight=False)


def write_json(path: Path, results: dict[str, Any], found: list[Figure], checked: list[Target]) -> None:
    document = {
        **results,
        "figures": [{**asdict(figure), "ratio": figure.ratio} for figure in found],
        "targets": [asdict(target) for target in checked],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
