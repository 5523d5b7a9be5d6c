"""Every statement the worker sends to PostgreSQL, each written out whole under its name.

`jobs.runtime.leases` runs them (straight through the pooled connection's asyncpg driver) and decides what their
results mean; nothing else in the worker writes SQL. Values are `:name` parameters; status words and event kinds
come from the enums of `service.models`, so print a statement to read it as PostgreSQL does, or to EXPLAIN it
(docs/database.md):

    python -c 'from jobs.runtime import sql; print(sql.CLAIM)'

The fence. A claim bumps `ops_job.attempt`; `(attempt, lease_owner)` is the fencing token. Every fenced write starts
with the CTE `fence`: the job row, locked FOR SHARE, if it is still running on that token. A takeover (the claim of
another worker, an UPDATE of that row) waits for the lock or makes the fence find nothing; so once the job is taken
over, nothing the old holder sends changes anything. `go` is the fence unless a cancel was requested: the writes
that start work are made under `go`, the ones that record work done or hand the job back under the fence alone.
Every fenced write ends with the same row: `held` (did the fence find the job) and `cancel_requested_at`.

`..._AFTER_DONE`: the same write, first recording the step that just finished (`done`), so that moving on from one
step to the next is one statement. `done` is made under the fence only, so that it is recorded even when a cancel
request stops the next step from starting; and only while the step is unfinished, so that sending it again after a
write whose outcome is unknown (an interrupted one) changes nothing.
"""

from __future__ import annotations

from service.models import EventKind, JobStatus, StepStatus

# The claim: the job row moves to this worker (a takeover only once the lease expired); its first unfinished step
# starts, unless a cancel was requested; the `claimed` event names whose lease was taken over; and the job's type,
# params, state and steps (as they were before this statement) come back. No row: someone else holds it, or it ended.
# `blocked_runs`: how many runs of the job, since a step of it last finished (or it was retried), lost their lease by
# blocking their worker's event loop (each one's worker recorded it: BLOCKED_PAST_LEASE).
CLAIM = f"""
WITH previous AS (
    SELECT lease_owner FROM ops_job WHERE job_id = :job_id
),

job AS (
    UPDATE ops_job SET status = '{JobStatus.RUNNING}', attempt = attempt + 1, lease_owner = CAST(:owner AS text),
        lease_expires_at = now() + make_interval(secs => CAST(:ttl AS double precision)),
        started_at = coalesce(started_at, now())
    WHERE job_id = :job_id
        AND (status = '{JobStatus.PENDING}' OR (status = '{JobStatus.RUNNING}' AND lease_expires_at < now()))
    RETURNING attempt, type, params, state, cancel_requested_at
),
first AS (
    SELECT step_order, name FROM ops_job_step
    WHERE job_id = :job_id AND status NOT IN ('{StepStatus.SUCCESS}', '{StepStatus.SKIPPED}')
    ORDER BY step_order LIMIT 1
),
started AS (
    UPDATE ops_job_step SET status = '{StepStatus.RUNNING}', attempts = attempts + 1, started_at = now(),
        finished_at = NULL
    WHERE job_id = :job_id AND step_order = (SELECT step_order FROM first)
        AND EXISTS (SELECT 1 FROM job WHERE cancel_requested_at IS NULL)
    RETURNING step_order
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, step, status, detail, attempt, actor)
    SELECT :job_id, e.kind, e.step, e.status, e.detail, job.attempt, CAST(:actor AS text)
    FROM job, previous, LATERAL (VALUES
        (1, '{EventKind.CLAIMED}', NULL, '{JobStatus.RUNNING}', 'by ' || CAST(:owner AS text)
            || coalesce('; took over from ' || previous.lease_owner || ', whose lease expired', '')),
        (2, '{EventKind.STEP}', (SELECT name FROM first), '{StepStatus.RUNNING}', NULL)
    ) AS e (n, kind, step, status, detail)
    WHERE e.n = 1 OR EXISTS (SELECT 1 FROM started)
    ORDER BY e.n
    RETURNING 1
)
SELECT job.attempt, job.type, job.params, job.state, previous.lease_owner AS previous_owner,
    (SELECT step_order FROM started) AS started_step,
    (SELECT count(*) FROM ops_job_event
        WHERE job_id = :job_id AND kind = '{EventKind.PROGRESS}' AND attempt IS NULL
            AND event_id > coalesce((SELECT max(event_id) FROM ops_job_event WHERE job_id = :job_id
                AND (kind = '{EventKind.RETRIED}' OR (kind = '{EventKind.STEP}'
                    AND status IN ('{StepStatus.SUCCESS}', '{StepStatus.SKIPPED}', '{StepStatus.FAILED}')))), 0)
    ) AS blocked_runs,
    (SELECT json_agg(json_build_array(step_order, name, status, attempts, detail) ORDER BY step_order)
        FROM ops_job_step WHERE job_id = :job_id) AS steps
FROM job, previous
"""

# Does PostgreSQL answer? Sent while it seemed unreachable, to find out when it is back.
PING = "SELECT 1"

# Writes nothing: is the job still ours, and has a cancel been requested?
CHECK = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# The lease runs for another `ttl` seconds from now; not once a cancel was requested (the worker stops instead).
RENEW = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
),
go AS (
    SELECT 1 FROM fence WHERE cancel_requested_at IS NULL
),
job AS (
    UPDATE ops_job SET lease_expires_at = now() + make_interval(secs => CAST(:ttl AS double precision))
    WHERE job_id = :job_id AND EXISTS (SELECT 1 FROM go)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# Step `step_order` (named `step`) runs (again): its attempts count up; not once a cancel was requested.
START_STEP = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
),
go AS (
    SELECT 1 FROM fence WHERE cancel_requested_at IS NULL
),
step AS (
    UPDATE ops_job_step SET status = '{StepStatus.RUNNING}', attempts = attempts + 1, started_at = now(),
        finished_at = NULL
    WHERE job_id = :job_id AND step_order = CAST(:step_order AS integer) AND EXISTS (SELECT 1 FROM go)
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, step, status, detail, attempt, actor)
    SELECT :job_id, '{EventKind.STEP}', CAST(:step AS text), '{StepStatus.RUNNING}', NULL,
        CAST(:attempt AS integer), CAST(:actor AS text)
    FROM go
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# START_STEP, after recording step `done_order` (named `done_step`) as `done_status` with `done_detail`.
START_STEP_AFTER_DONE = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
),
go AS (
    SELECT 1 FROM fence WHERE cancel_requested_at IS NULL
),
done AS (
    UPDATE ops_job_step SET status = CAST(:done_status AS text), finished_at = now(),
        detail = coalesce(CAST(:done_detail AS text), detail)
    WHERE job_id = :job_id AND step_order = CAST(:done_order AS integer)
        AND status IN ('{StepStatus.PENDING}', '{StepStatus.RUNNING}') AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
step AS (
    UPDATE ops_job_step SET status = '{StepStatus.RUNNING}', attempts = attempts + 1, started_at = now(),
        finished_at = NULL
    WHERE job_id = :job_id AND step_order = CAST(:step_order AS integer) AND EXISTS (SELECT 1 FROM go)
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, step, status, detail, attempt, actor)
    SELECT :job_id, e.kind, e.step, e.status, e.detail, CAST(:attempt AS integer), CAST(:actor AS text)
    FROM (VALUES
        (1, '{EventKind.STEP}', CAST(:done_step AS text), CAST(:done_status AS text), CAST(:done_detail AS text),
            EXISTS (SELECT 1 FROM done)),
        (2, '{EventKind.STEP}', CAST(:step AS text), '{StepStatus.RUNNING}', NULL, EXISTS (SELECT 1 FROM go))
    ) AS e (n, kind, step, status, detail, ok)
    WHERE e.ok
    ORDER BY e.n
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# What the running step says it is doing, on the step and in the history.
PROGRESS = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
),
step AS (
    UPDATE ops_job_step SET detail = CAST(:detail AS text)
    WHERE job_id = :job_id AND step_order = CAST(:step_order AS integer) AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, step, status, detail, attempt, actor)
    SELECT :job_id, '{EventKind.PROGRESS}', CAST(:step AS text), NULL, CAST(:detail AS text),
        CAST(:attempt AS integer), CAST(:actor AS text)
    FROM fence
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# Merge `state` (a JSON object) into the job's state, for later steps and for a resumed run.
REMEMBER = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
),
job AS (
    UPDATE ops_job SET state = state || CAST(:state AS jsonb)
    WHERE job_id = :job_id AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# Step `done_order` (named `done_step`) finished as `done_status` with `done_detail`, recorded on its own.
FINISH_STEP = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
),
done AS (
    UPDATE ops_job_step SET status = CAST(:done_status AS text), finished_at = now(),
        detail = coalesce(CAST(:done_detail AS text), detail)
    WHERE job_id = :job_id AND step_order = CAST(:done_order AS integer)
        AND status IN ('{StepStatus.PENDING}', '{StepStatus.RUNNING}') AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, step, status, detail, attempt, actor)
    SELECT :job_id, '{EventKind.STEP}', CAST(:done_step AS text), CAST(:done_status AS text),
        CAST(:done_detail AS text), CAST(:attempt AS integer), CAST(:actor AS text)
    FROM done
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# The job ends as `job_status` (with `error`, or NULL) and the lease is gone.
FINISH_JOB = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
),
job AS (
    UPDATE ops_job SET status = CAST(:job_status AS text), error = CAST(:error AS text), finished_at = now(),
        lease_owner = NULL, lease_expires_at = NULL
    WHERE job_id = :job_id AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, step, status, detail, attempt, actor)
    SELECT :job_id, '{EventKind.FINISHED}', NULL, CAST(:job_status AS text), CAST(:error AS text),
        CAST(:attempt AS integer), CAST(:actor AS text)
    FROM fence
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# FINISH_JOB, after recording step `done_order` (named `done_step`) as `done_status` with `done_detail`.
FINISH_JOB_AFTER_DONE = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
),
done AS (
    UPDATE ops_job_step SET status = CAST(:done_status AS text), finished_at = now(),
        detail = coalesce(CAST(:done_detail AS text), detail)
    WHERE job_id = :job_id AND step_order = CAST(:done_order AS integer)
        AND status IN ('{StepStatus.PENDING}', '{StepStatus.RUNNING}') AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
job AS (
    UPDATE ops_job SET status = CAST(:job_status AS text), error = CAST(:error AS text), finished_at = now(),
        lease_owner = NULL, lease_expires_at = NULL
    WHERE job_id = :job_id AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, step, status, detail, attempt, actor)
    SELECT :job_id, e.kind, e.step, e.status, e.detail, CAST(:attempt AS integer), CAST(:actor AS text)
    FROM (VALUES
        (1, '{EventKind.STEP}', CAST(:done_step AS text), CAST(:done_status AS text), CAST(:done_detail AS text),
            EXISTS (SELECT 1 FROM done)),
        (2, '{EventKind.FINISHED}', NULL, CAST(:job_status AS text), CAST(:error AS text),
            EXISTS (SELECT 1 FROM fence))
    ) AS e (n, kind, step, status, detail, ok)
    WHERE e.ok
    ORDER BY e.n
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# The job is handed back (the worker stops): pending again, no lease, so any worker may claim it at once; the step
# that was running is pending again, its detail saying why, and runs again.
RELEASE = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
),
job AS (
    UPDATE ops_job SET status = '{JobStatus.PENDING}', lease_owner = NULL, lease_expires_at = NULL
    WHERE job_id = :job_id AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
steps AS (
    UPDATE ops_job_step SET status = '{StepStatus.PENDING}', detail = CAST(:detail AS text)
    WHERE job_id = :job_id AND status = '{StepStatus.RUNNING}' AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, step, status, detail, attempt, actor)
    SELECT :job_id, '{EventKind.RELEASED}', NULL, '{JobStatus.PENDING}', CAST(:detail AS text),
        CAST(:attempt AS integer), CAST(:actor AS text)
    FROM fence
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# RELEASE, after recording step `done_order` (named `done_step`) as `done_status` with `done_detail`.
RELEASE_AFTER_DONE = f"""
WITH fence AS (
    SELECT cancel_requested_at FROM ops_job
    WHERE job_id = :job_id AND attempt = CAST(:attempt AS integer) AND lease_owner = :owner
        AND status = '{JobStatus.RUNNING}'
    FOR SHARE
),
done AS (
    UPDATE ops_job_step SET status = CAST(:done_status AS text), finished_at = now(),
        detail = coalesce(CAST(:done_detail AS text), detail)
    WHERE job_id = :job_id AND step_order = CAST(:done_order AS integer)
        AND status IN ('{StepStatus.PENDING}', '{StepStatus.RUNNING}') AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
job AS (
    UPDATE ops_job SET status = '{JobStatus.PENDING}', lease_owner = NULL, lease_expires_at = NULL
    WHERE job_id = :job_id AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
steps AS (
    UPDATE ops_job_step SET status = '{StepStatus.PENDING}', detail = CAST(:detail AS text)
    WHERE job_id = :job_id AND status = '{StepStatus.RUNNING}' AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, step, status, detail, attempt, actor)
    SELECT :job_id, e.kind, e.step, e.status, e.detail, CAST(:attempt AS integer), CAST(:actor AS text)
    FROM (VALUES
        (1, '{EventKind.STEP}', CAST(:done_step AS text), CAST(:done_status AS text), CAST(:done_detail AS text),
            EXISTS (SELECT 1 FROM done)),
        (2, '{EventKind.RELEASED}', NULL, '{JobStatus.PENDING}', CAST(:detail AS text), EXISTS (SELECT 1 FROM fence))
    ) AS e (n, kind, step, status, detail, ok)
    WHERE e.ok
    ORDER BY e.n
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM fence) AS held, (SELECT cancel_requested_at FROM fence) AS cancel_requested_at
"""

# History only: step `step` of the job blocked this worker's event loop past its lease (`detail` says for how long).
# Not fenced, and no attempt: the lease is gone, and the note may land after the next claim's events, as the reaper's
# do. The next claims count these notes (CLAIM's `blocked_runs`).
BLOCKED_PAST_LEASE = f"""
INSERT INTO ops_job_event (job_id, kind, step, status, detail, actor)
VALUES (:job_id, '{EventKind.PROGRESS}', CAST(:step AS text), NULL, CAST(:detail AS text), CAST(:actor AS text))
"""

# Who asked for the cancel the worker has just found requested (the latest request), for the job's error.
CANCEL_REQUESTED_BY = f"""
SELECT actor FROM ops_job_event
WHERE job_id = :job_id AND kind = '{EventKind.CANCEL_REQUESTED}'
ORDER BY event_id DESC
LIMIT 1
"""

# The reaper's scan: jobs that need a delivery, oldest first. Pending for over `pending_after_s` (maybe never
# enqueued), or running on an expired lease (their worker died); `waited_s`: how long since it became due. The
# first condition is the predicate of the partial index `ix_ops_job_active_created_at`, which serves the scan.
DUE_FOR_DELIVERY = f"""
SELECT job_id, attempt, status, lease_owner,
    extract(epoch FROM now() - coalesce(lease_expires_at, created_at)) AS waited_s
FROM ops_job
WHERE status IN ('{JobStatus.PENDING}', '{JobStatus.RUNNING}')
    AND ((status = '{JobStatus.PENDING}'
            AND created_at < now() - make_interval(secs => CAST(:pending_after_s AS double precision)))
        OR (status = '{JobStatus.RUNNING}' AND lease_expires_at < now()))
ORDER BY created_at
LIMIT CAST(:limit AS bigint)
"""

# History for the jobs the reaper put back on the queue: one `redelivered` event per job (arrays of equal length).
# No attempt: the reaper holds no lease, and its note may land after the next claim's events.
RECORD_REDELIVERED = f"""
INSERT INTO ops_job_event (job_id, kind, status, detail, actor)
SELECT d.job_id, '{EventKind.REDELIVERED}', d.status, d.detail, CAST(:actor AS text)
FROM unnest(CAST(:job_ids AS text[]), CAST(:statuses AS text[]), CAST(:details AS text[]))
    AS d (job_id, status, detail)
"""

# The reaper's end of an approval's wait: jobs still awaiting approval past their deadline (the database's clock, as
# set when the approval was requested) are rejected, oldest deadline first, each with its `rejected` and `finished`
# events. SKIP LOCKED: an approval or a cancel holding the row decides it instead; reapers on other workers take
# other rows. Served by the partial index `ix_ops_job_approval_expires_at`.
EXPIRE_APPROVALS = f"""
WITH expired AS (
    UPDATE ops_job SET status = '{JobStatus.REJECTED}', finished_at = now(), error = 'approval expired'
    WHERE job_id IN (
        SELECT job_id FROM ops_job
        WHERE status = '{JobStatus.AWAITING_APPROVAL}' AND approval_expires_at <= now()
        ORDER BY approval_expires_at
        LIMIT CAST(:limit AS bigint)
        FOR UPDATE SKIP LOCKED
    )
    RETURNING job_id, approvals_given, approvals_required, approval_expires_at
),
event AS (
    INSERT INTO ops_job_event (job_id, kind, status, detail, actor)
    SELECT expired.job_id, e.kind, '{JobStatus.REJECTED}', e.detail, CAST(:actor AS text)
    FROM expired, LATERAL (VALUES
        (1, '{EventKind.REJECTED}', format('approval expired: %s of %s approvals by %s',
            expired.approvals_given, expired.approvals_required, expired.approval_expires_at)),
        (2, '{EventKind.FINISHED}', NULL)
    ) AS e (n, kind, detail)
    ORDER BY expired.job_id, e.n
    RETURNING 1
)
SELECT job_id FROM expired
"""
