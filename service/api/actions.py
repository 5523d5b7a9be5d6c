"""What a caller can do to jobs, each in one place for every way in: the JSON API's routes and the console's forms
call these, with the caller already authenticated, and only render the outcome differently. Each action checks
the scope it needs itself, whichever way it was reached."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from service.api.approvals import Approve, Reject, approve_job, reject_job
from service.api.auth import Principal
from service.api.repository import Caller, Created, cancel_job, create_job, get_job, retry_job
from service.api.request_body import validate
from service.api.schemas import JobOut
from service.api.state import AppState
from service.jobtypes import JobType
from service.models import JobStatus
from service.queue import enqueue
from service.settings import ApprovalPolicy, Scope


async def submit(
    state: AppState, principal: Principal, caller: Caller, type_name: str, body: bytes, key: str | None
) -> Created:
    """Validate `body` (a JSON object) as the type's params, check the target, write the job and deliver it."""
    principal.require(Scope.WRITE)
    job_type = state.registry.get(type_name)
    params = validate(job_type.params, body, context=state.registry.params_context(job_type.name))
    target = job_type.target_of(params)
    principal.check_target(target)
    policy = _approval_policy(state, job_type, params, target)
    async with state.autocommit.connect() as conn:
        created = await create_job(conn, job_type, params, target, caller, key, policy)
    if not created.replayed:
        # Only after the commit: a worker must never receive an id whose row it cannot see yet.
        await enqueue_if_pending(state, created.job)
    return created


async def cancel(state: AppState, principal: Principal, caller: Caller, job_id: str) -> JobOut:
    principal.require(Scope.WRITE)
    async with state.autocommit.connect() as conn:
        return await cancel_job(conn, job_id, caller, principal.allows(Scope.ADMIN))


async def retry(state: AppState, principal: Principal, caller: Caller, job_id: str) -> JobOut:
    principal.require(Scope.WRITE)
    async with state.autocommit.connect() as conn:
        # A retry runs the job again: it needs approval again if a policy covers it now. Type, params and target
        # never change, so reading them first is safe.
        earlier = await get_job(conn, job_id, team=principal.team_filter)
        job_type = state.registry.get(earlier.type)
        params = validate(job_type.params, earlier.params, context=state.registry.params_context(job_type.name))
        policy = _approval_policy(state, job_type, params, earlier.target)
        job = await retry_job(conn, job_id, caller, principal.allows(Scope.ADMIN), policy)
    await enqueue_if_pending(state, job)
    return job


async def approve(state: AppState, principal: Principal, caller: Caller, job_id: str, approval: Approve) -> JobOut:
    principal.require(Scope.APPROVE)
    async with state.autocommit.connect() as conn:
        job = await approve_job(conn, job_id, caller, approval)
    await enqueue_if_pending(state, job)  # the last approval needed: it runs now
    return job


async def reject(state: AppState, principal: Principal, caller: Caller, job_id: str, rejection: Reject) -> JobOut:
    principal.require(Scope.APPROVE)
    async with state.autocommit.connect() as conn:
        return await reject_job(conn, job_id, caller, rejection)


def _approval_policy(
    state: AppState, job_type: JobType[Any], params: BaseModel, target: str | None
) -> ApprovalPolicy | None:
    """The approval policy a run of these params falls under; none for a run that changes nothing (a dry run)."""
    if job_type.changes_nothing(params):
        return None
    return state.settings.approval_policy(job_type.name, target)


async def enqueue_if_pending(state: AppState, job: JobOut) -> None:
    """Deliver a job that may run now; one awaiting approval is delivered once approved."""
    if job.status != JobStatus.PENDING:
        return
    await enqueue(
        state.redis,
        job.job_id,
        job.attempt,
        queue_name=state.settings.queue_name,
        timeout_s=state.settings.enqueue_timeout_s,
    )
