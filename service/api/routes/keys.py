"""`/ops/keys`: API keys managed at run time, by the service's operators (scope `admin`): mint one (the key is
shown once), list them, revoke one (refused by every API process as soon as the revocation commits)."""

from __future__ import annotations

from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.api.auth import caller_of, require
from service.api.keys import KeyList, NewKey
from service.api.request_body import read_json_object, validate
from service.api.schemas import ModelResponse
from service.api.state import AppState
from service.settings import Scope


async def create_key(request: Request) -> Response:
    state = AppState.of(request)
    principal = await require(request, Scope.SERVICE_ADMIN)
    new = validate(NewKey, await read_json_object(request, state.settings.max_body_bytes))
    minted = await state.keys.mint(new, caller_of(request, principal))
    return ModelResponse(minted, status_code=201)


async def list_keys(request: Request) -> Response:
    state = AppState.of(request)
    await require(request, Scope.SERVICE_ADMIN)
    return ModelResponse(KeyList(keys=await state.keys.list()))


async def revoke_key(request: Request) -> Response:
    state = AppState.of(request)
    principal = await require(request, Scope.SERVICE_ADMIN)
    revoked = await state.keys.revoke(request.path_params["key_id"], caller_of(request, principal))
    return ModelResponse(revoked)


class Keys(HTTPEndpoint):
    """One route for both methods, so that a 405 names every method the URL takes."""

    async def get(self, request: Request) -> Response:
        return await list_keys(request)

    async def post(self, request: Request) -> Response:
        return await create_key(request)


routes = [Route("/ops/keys", Keys), Route("/ops/keys/{key_id}", revoke_key, methods=["DELETE"])]
