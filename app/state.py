"""What request handlers get from the composition root (`app.main.create_app`): the services
its lifespan builds, handed out through Starlette's lifespan state, and the request id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection, Request

from app.config import Settings
from app.events import EventBus
from app.jobs import JobRunner
from app.oidc import OidcVerifier
from app.storage import Storage
from app.tokens import TokenCache
from app.view_urls import ViewUrlSigner


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    # For single-statement reads (app.db.create_read_sessionmaker): the dataloaders.
    reads: async_sessionmaker[AsyncSession]
    storage: Storage
    oidc: OidcVerifier | None
    # The background jobs of this process; requests wake one when they leave it work.
    jobs: JobRunner
    events: EventBus
    view_urls: ViewUrlSigner
    # API tokens found valid lately (TOKEN_CACHE_SECONDS), for authenticate_request.
    tokens: TokenCache


class LifespanState(TypedDict):
    services: Services


def services_of(request: HTTPConnection) -> Services:
    services = request.state.services
    if not isinstance(services, Services):
        raise TypeError("the app was started without its lifespan")
    return services


def request_id_of(request: Request) -> str:
    """Set for every HTTP request by `app.access.AccessMiddleware`."""
    request_id = request.state.request_id
    if not isinstance(request_id, str):
        raise TypeError("the request went around AccessMiddleware")
    return request_id
