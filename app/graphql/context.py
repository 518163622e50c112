from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request

from app.config import Settings
from app.storage import Storage

if TYPE_CHECKING:
    from app.graphql.loaders import Loaders


@dataclass
class Context:
    request: Request
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    storage: Storage
    request_id: str
    loaders: Loaders = field(init=False)

    def __post_init__(self) -> None:
        from app.graphql.loaders import Loaders

        self.loaders = Loaders(self.sessionmaker)


Info = strawberry.Info[Context, None]
