"""A history of finished jobs, inserted by PostgreSQL itself (INSERT ... SELECT generate_series), for the list
pages: a million rows in well under a minute instead of an hour of submissions.

The spread is plausible rather than uniform: 4 job types out of 5 are `noop`, statuses 90% success, 7% failed,
3% cancelled (chosen by a hash, so they do not line up with the types), 4 actors, a job every 30 s going back
about a year, and steps for one job in five. Only finished jobs: a pending one would be picked up by a reaper.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg

from tests.bench.scenarios import ListCase

CHUNK = 250_000

INSERT_JOBS = """
INSERT INTO ops_job (job_id, type, status, params, target, actor, source_ip, attempt, error,
                     created_at, started_at, finished_at)
SELECT t.type || '-s' || substr(md5(g::text), 1, 24),
       t.type,
       CASE WHEN t.r < 90 THEN 'success' WHEN t.r < 97 THEN 'failed' ELSE 'cancelled' END,
       CASE WHEN t.type = 'noop' THEN '{"steps": 2, "sleep_s": 0, "fail_at_step": null, "target": null}'::jsonb
            ELSE jsonb_build_object('namespace', 'db', 'cluster', 'pg-' || g % 40, 'pod', 'pg-' || g % 40 || '-1',
                                    'dry_run', false) END,
       CASE WHEN t.type = 'pg-rebuild' THEN 'k8s/default/db/pg-' || g % 40 END,
       (ARRAY['alice', 'bob', 'ci', 'nightly'])[1 + g % 4],
       '10.0.' || g % 250 || '.' || g % 200,
       1,
       CASE WHEN t.r >= 90 AND t.r < 97 THEN 'step step-2 failed: NoopFailure: failed on purpose at step 2' END,
       t.created_at,
       t.created_at + interval '40 milliseconds',
       t.created_at + make_interval(secs => 1 + g % 300)
FROM generate_series($1::int, $2::int) AS g,
     LATERAL (SELECT CASE WHEN g % 5 = 0 THEN 'pg-rebuild' ELSE 'noop' END AS type,
                     abs(hashtext(g::text)) % 100 AS r,
                     now() - interval '1 hour' - make_interval(secs => ($3::int - g) * 30) AS created_at) AS t
"""

INSERT_STEPS = """
INSERT INTO ops_job_step (job_id, step_order, name, status, detail, attempts, started_at, finished_at)
SELECT j.job_id, n, 'step-' || n, CASE WHEN j.status = 'success' THEN 'success' ELSE 'pending' END,
       CASE WHEN j.status = 'success' THEN 'slept 0s' END, 1, j.started_at, j.finished_at
FROM ops_job j, generate_series(1, 2) AS n
WHERE j.job_id LIKE '%-s%' AND j.created_at >= $1 AND j.created_at < $2 AND hashtext(j.job_id) % 5 = 0
"""


async def seed(db: asyncpg.Connection, rows: int, say: Callable[[str], None]) -> float:
    """Insert `rows` finished jobs; returns the seconds it took (VACUUM ANALYZE included)."""
    started = time.perf_counter()
    for first in range(1, rows + 1, CHUNK):
        last = min(rows, first + CHUNK - 1)
        await db.execute(INSERT_JOBS, first, last, rows)
        say(f"seeded {last:,} of {rows:,} jobs")
    bounds = await db.fetchrow(
        "SELECT min(created_at) AS lo, max(created_at) AS hi FROM ops_job WHERE job_id LIKE '%-s%'"
    )
    assert bounds is not None
    await db.execute(INSERT_STEPS, bounds["lo"], bounds["hi"] + timedelta(microseconds=1))
    # Old history is vacuumed and analysed by autovacuum in real life; do it now so plans and index-only scans
    # are what a long-running service would get.
    await db.execute("VACUUM (ANALYZE) ops_job, ops_job_step")
    return time.perf_counter() - started


async def list_cases(db: asyncpg.Connection, deep_offset: int) -> list[ListCase]:
    """First and deep pages, unfiltered and filtered by status; a deep cursor is the row at that offset."""
    deep = await db.fetchrow(
        "SELECT created_at, job_id FROM ops_job ORDER BY created_at DESC, job_id DESC OFFSET $1 LIMIT 1", deep_offset
    )
    failed = await db.fetchval("SELECT count(*) FROM ops_job WHERE status = 'failed'")
    deep_failed = await db.fetchrow(
        """SELECT created_at, job_id FROM ops_job WHERE status = 'failed'
           ORDER BY created_at DESC, job_id DESC OFFSET $1 LIMIT 1""",
        failed // 2,
    )
    assert deep is not None and deep_failed is not None
    return [
        ListCase("first page", None, None),
        ListCase(f"deep page (after {deep_offset:,})", None, _cursor(deep)),
        ListCase("first page, status=failed", "failed", None),
        ListCase(f"deep page, status=failed (after {failed // 2:,})", "failed", _cursor(deep_failed)),
    ]


def _cursor(row: asyncpg.Record) -> tuple[datetime, str]:
    return row["created_at"], row["job_id"]
