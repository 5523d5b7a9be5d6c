"""What the API process holds for its lifetime, created by the app's lifespan and read by every request."""

from __future__ import annotations

from dataclasses import dataclass

from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from service.api.auth import KeyRing
from service.api.event_hub import EventHub
from service.api.keys import KeyStore
from service.api.session import Sessions
from service.jobtypes import Registry
from service.settings import Settings


@dataclass(frozen=True)
class AppState:
    settings: Settings
    engine: AsyncEngine
    # The engine in autocommit, for reads and writes made in one statement (each its own transaction).
    autocommit: AsyncEngine
    redis: ArqRedis
    registry: Registry
    keyring: KeyRing
    keys: KeyStore
    hub: EventHub
    sessions: Sessions

    @staticmethod
    def of(request: Request) -> AppState:
        state: AppState = request.state.app
        return state
