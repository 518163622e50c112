from __future__ import annotations

from dataclasses import dataclass, field

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit import Actor
from app.config import Settings
from app.events import EventBus
from app.graphql.documents import Admitted
from app.graphql.loaders import Loaders
from app.jobs import JobRunner
from app.principals import Principal
from app.storage import Storage
from app.view_urls import ViewUrlSigner


@dataclass
class Context:
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    storage: Storage
    actor: Actor
    jobs: JobRunner
    events: EventBus
    view_urls: ViewUrlSigner
    # The request's document, parsed and checked before execution (POST/GET /graphql only).
    admitted: Admitted | None = field(default=None, kw_only=True)
    # Sessions for the dataloaders' reads (Services.reads); `sessionmaker` when not given.
    reads: async_sessionmaker[AsyncSession] | None = field(default=None, kw_only=True)
    loaders: Loaders = field(init=False)

    def __post_init__(self) -> None:
        self.loaders = Loaders(self.reads or self.sessionmaker)

    @property
    def principal(self) -> Principal:
        return self.actor.principal


Info = strawberry.Info[Context, None]
