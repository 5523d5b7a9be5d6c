"""`/openapi.json`: the API's contract, generated from the models that enforce it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.api.openapi import openapi_document
from service.api.state import AppState


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_document(AppState.of(request).registry))


routes = [Route("/openapi.json", openapi, methods=["GET"])]
