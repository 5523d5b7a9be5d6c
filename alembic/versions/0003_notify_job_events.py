"""Every new job event is announced on the `apiops_job_events` channel, for live streams.

A trigger rather than application code, so no writer (API, worker, reaper, or a future one) can forget it. The
payload is `<job_id> <event_id>`: small, well under NOTIFY's 8000-byte limit whatever the event's detail.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 19:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION ops_job_event_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('apiops_job_events', NEW.job_id || ' ' || NEW.event_id);
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER ops_job_event_notify AFTER INSERT ON ops_job_event
        FOR EACH ROW EXECUTE FUNCTION ops_job_event_notify()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER ops_job_event_notify ON ops_job_event")
    op.execute("DROP FUNCTION ops_job_event_notify()")
