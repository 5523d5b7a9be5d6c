"""What a job's recorded history and a recording step's ticks must show: no step ran on two workers at once."""

from __future__ import annotations

from pathlib import Path

import asyncpg


async def assert_no_step_ran_on_two_workers_at_once(
    db: asyncpg.Connection, job_ids: list[str], steps: int | list[str], expect_takeover: bool = True
) -> None:
    """From the recorded history. Writes are fenced by (attempt, owner) under a row lock and events take their ids
    from one sequence, so event order is commit order: once any event of attempt N+1 exists, no event of attempt
    N may follow, every attempt belongs to one worker, and each step succeeds exactly once. `steps`: the step names,
    or how many `step-<n>` steps (noop's)."""
    names = [f"step-{n}" for n in range(1, steps + 1)] if isinstance(steps, int) else steps
    rows = await db.fetch(
        "SELECT job_id, kind, step, status, attempt, actor FROM ops_job_event"
        " WHERE attempt IS NOT NULL AND job_id = ANY($1::text[]) ORDER BY job_id, event_id",
        job_ids,
    )
    history: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        history.setdefault(row["job_id"], []).append(row)
    assert set(history) == set(job_ids)
    took_over = 0
    for job_id, events in history.items():
        attempts = [e["attempt"] for e in events]
        assert attempts == sorted(attempts), f"{job_id}: an older attempt wrote after a newer one: {attempts}"
        owners: dict[int, set[str]] = {}
        for event in events:
            owners.setdefault(event["attempt"], set()).add(event["actor"])
        assert all(len(o) == 1 for o in owners.values()), f"{job_id}: one attempt, several workers: {owners}"
        successes = [e["step"] for e in events if e["kind"] == "step" and e["status"] == "success"]
        assert sorted(successes) == sorted(names), f"{job_id}: {successes}"
        took_over += len(owners) > 1
    if expect_takeover:
        assert took_over > 0, "no job was ever taken over: the kills did not test anything"


def tick_spans(path: Path) -> dict[int, tuple[float, float]]:
    """From a recording step's ticks (`tests.testjobs.RECORDER`): each attempt's first and last tick."""
    spans: dict[int, tuple[float, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        attempt, at = int(line.split()[0]), float(line.split()[1])
        first, last = spans.get(attempt, (at, at))
        spans[attempt] = (min(first, at), max(last, at))
    return spans


def assert_no_two_attempts_ran_at_once(spans: dict[int, tuple[float, float]]) -> None:
    """Each attempt ran (first tick to last) after the one before it had stopped: no instant with two."""
    ordered = sorted(spans.items())
    for (before, (_, ended)), (after, (started, _)) in zip(ordered, ordered[1:], strict=False):
        assert ended < started, f"attempt {before} still ran {ended - started:.2f}s after attempt {after} started"
