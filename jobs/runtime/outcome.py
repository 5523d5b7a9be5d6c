"""What one delivery of a job came to: `run_job`'s answer, which arq logs, the worker acts on and the metrics count.

Only three outcomes finish the job, each with its final status; in the others the job goes on elsewhere (another
worker holds it, or takes it up after this one stops) or was not this worker's to run at all.
"""

from __future__ import annotations

from enum import StrEnum

from service.models import JobStatus


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LEASE_LOST = "lease lost"
    HANDED_BACK = "handed back: worker stopping"
    NOT_CLAIMED = "not claimed"
    NOT_CLAIMED_STOPPING = "not claimed: worker stopping"
    NOT_CLAIMED_UNREACHABLE = "not claimed: PostgreSQL unreachable"

    @property
    def status(self) -> JobStatus | None:
        """The job's final status when this run finished it, else None."""
        return _FINISHED_AS.get(self)


_FINISHED_AS = {
    Outcome.SUCCESS: JobStatus.SUCCESS,
    Outcome.FAILED: JobStatus.FAILED,
    Outcome.CANCELLED: JobStatus.CANCELLED,
}
