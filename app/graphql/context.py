from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from app.audit import Actor
from app.auth import Principal
from app.config import Settings
from app.events import EventBus
from app.storage import Storage
from app.view_urls import ViewUrlSigner

if TYPE_CHECKING:
    from app.graphql.loaders import Loaders


@dataclass
class Context:
    # The HTTP request, or the WebSocket of a subscription.
    request: HTTPConnection
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    storage: Storage
    request_id: str
    principal: Principal
    events: EventBus
    view_urls: ViewUrlSigner
    loaders: Loaders = field(init=False)

    def __post_init__(self) -> None:
        from app.graphql.loaders import Loaders

        self.loaders = Loaders(self.sessionmaker)

    @property
    def actor(self) -> Actor:
        client = self.request.client if self.request is not None else None
        return Actor(
            principal=self.principal,
            request_id=self.request_id,
            client_ip=client.host if client else None,
            user_agent=self.request.headers.get("user-agent") if self.request is not None else None,
        )


Info = strawberry.Info[Context, None]
