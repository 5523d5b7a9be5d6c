"""The JSON the API returns, as pydantic models."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from service.jobtypes import JobType


class StepOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    step_order: int
    status: str
    detail: str | None
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    job_id: str
    type: str
    status: str
    params: dict[str, Any]
    target: str | None
    actor: str
    team: str
    source_ip: str | None
    attempt: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # Under an approval policy: the approvals it needs, those it has, and until when it may get them.
    approvals_required: int | None
    approvals_given: int
    approval_expires_at: datetime | None
    # The worker running it now (until its lease ends); None when no worker holds it.
    lease_owner: str | None = None
    # What its steps recorded for the steps after them (`ctx.remember`): e.g. the topology found at the start.
    state: dict[str, Any] = {}
    steps: list[StepOut]


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    event_id: int
    kind: str
    step: str | None
    status: str | None
    detail: str | None
    attempt: int | None
    actor: str | None
    source_ip: str | None
    created_at: datetime


class JobWithEvents(JobOut):
    """`GET /ops/jobs/{id}?include=events`: the job and its history."""

    events: list[EventOut]


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None


class JobTypeOut(BaseModel):
    name: str
    description: str
    params_schema: dict[str, Any]
    steps: list[str]


class ModelResponse(Response):
    """A model as a JSON response, serialized by pydantic itself: about three times cheaper than `json.dumps` of
    `model_dump(mode="json")`, for the same bytes."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        assert isinstance(content, BaseModel)
        return content.model_dump_json().encode()


def job_type_json(job_type: JobType[Any]) -> dict[str, Any]:
    return JobTypeOut(
        name=job_type.name,
        description=job_type.description,
        params_schema=job_type.params.model_json_schema(),
        steps=[step.name for step in job_type.steps],
    ).model_dump(mode="json")
