"""Job outcomes: which finish the job, and that they read as the words arq logs and the metrics label."""

from __future__ import annotations

from jobs.runtime.outcome import Outcome
from service.models import JobStatus


def test_only_finishing_outcomes_carry_a_status_and_they_read_as_the_metric_labels() -> None:
    finished = {outcome: outcome.status for outcome in Outcome if outcome.status is not None}
    assert finished == {
        Outcome.SUCCESS: JobStatus.SUCCESS,
        Outcome.FAILED: JobStatus.FAILED,
        Outcome.CANCELLED: JobStatus.CANCELLED,
    }
    assert all(str(outcome) == status.value for outcome, status in finished.items())
    assert f"{Outcome.HANDED_BACK}" == "handed back: worker stopping"
