"""The rule for database access (docs/database.md): status words come from the enums, never typed by hand, and
every named statement of the worker can be EXPLAINed as it is written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from jobs.runtime import sql
from jobs.runtime.leases import _Statement
from service.models import EventKind, JobStatus, StepStatus

ROOT = Path(__file__).resolve().parent.parent
WORDS = sorted({word.value for enum in (JobStatus, StepStatus, EventKind) for word in enum})
# A status word or event kind as an SQL literal: 'running', not {JobStatus.RUNNING} (which renders as the same).
QUOTED_WORD = re.compile(r"'(" + "|".join(WORDS) + r")'")
# The worker's statements, by name: every upper-case str constant of jobs.runtime.sql.
STATEMENTS = {name: value for name, value in vars(sql).items() if name.isupper() and isinstance(value, str)}
# A value of the right type for each parameter the statements take (EXPLAIN plans them, it runs nothing).
SAMPLES: dict[str, Any] = {
    "job_id": "noop-x", "owner": "w", "actor": "worker:w", "attempt": 1, "ttl": 30.0, "step_order": 1, "step": "s",
    "detail": "d", "state": "{}", "done_order": 1, "done_step": "s", "done_status": StepStatus.SUCCESS.value,
    "done_detail": None, "job_status": JobStatus.SUCCESS.value, "error": None, "pending_after_s": 5.0, "limit": 10,
    "job_ids": ["noop-x"], "statuses": [JobStatus.PENDING.value], "details": ["d"],
}  # fmt: skip


def hand_typed(source: str) -> list[str]:
    return QUOTED_WORD.findall(source)


def test_the_check_finds_a_status_word_typed_by_hand() -> None:
    assert hand_typed("UPDATE ops_job SET status = 'running' WHERE kind <> 'claimed'") == ["running", "claimed"]
    assert hand_typed(f"UPDATE ops_job SET status = '{JobStatus.RUNNING}'") == ["running"]  # rendered: same text
    assert hand_typed("UPDATE ops_job SET status = '{JobStatus.RUNNING}'") == []  # the source form
    assert hand_typed("SELECT 'runner', \"running\"") == []


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(ROOT)) for folder in ("service", "jobs") for p in (ROOT / folder).rglob("*.py"))
)
def test_no_status_word_is_typed_by_hand_in_runtime_code(path: str) -> None:
    """Statuses and event kinds in SQL come from the enums (f-strings or bound parameters); the migrations, frozen
    history, and the tests, which check the words as clients see them, may spell them out."""
    assert hand_typed((ROOT / path).read_text(encoding="utf-8")) == [], f"{path}: use the enums of service.models"


def test_the_statements_use_the_enums_words() -> None:
    """The scan above means something: the statements do carry status words, rendered from the enums."""
    assert f"status = '{JobStatus.RUNNING}'" in sql.CHECK
    assert f"'{EventKind.CLAIMED}'" in sql.CLAIM
    assert all(hand_typed(statement) for name, statement in STATEMENTS.items() if name != "PING")


def test_every_fenced_transition_has_its_statement() -> None:
    transitions = {"CLAIM", "CHECK", "RENEW", "START_STEP", "PROGRESS", "REMEMBER", "FINISH_STEP", "FINISH_JOB"}
    transitions |= {"RELEASE", "START_STEP_AFTER_DONE", "FINISH_JOB_AFTER_DONE", "RELEASE_AFTER_DONE"}
    assert transitions <= set(STATEMENTS)


@pytest.mark.parametrize("name", sorted(STATEMENTS))
async def test_each_worker_statement_can_be_explained_as_written(name: str, db: asyncpg.Connection) -> None:
    statement = _Statement.of(STATEMENTS[name])
    plan = await db.fetch(f"EXPLAIN {statement.sql}", *[SAMPLES[n] for n in statement.names])
    assert plan, name
