"""Who is calling: API tokens (hashed at rest) and optional OIDC bearer tokens; roles."""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.errors import BadUserInput, Forbidden, NotFound, Unauthenticated

if TYPE_CHECKING:
    from app.audit import Actor
    from app.models import ApiToken
    from app.oidc import OidcVerifier

TOKEN_PREFIX = "pmk_"
USER_PATTERN_MAX = 128


class Role(enum.Enum):
    READER = "READER"
    UPLOADER = "UPLOADER"
    ADMIN = "ADMIN"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.READER: 0, Role.UPLOADER: 1, Role.ADMIN: 2}


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    role: Role


ANONYMOUS_ADMIN = Principal(user="anonymous", role=Role.ADMIN)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def require(principal: Principal, needed: Role) -> None:
    if not principal.role.allows(needed):
        raise Forbidden(f"this needs the {needed.value} role; you have {principal.role.value}")


def require_owner(principal: Principal, created_by: str | None, what: str) -> None:
    """UPLOADERs change only what they created; ADMINs change anything."""
    require(principal, Role.UPLOADER)
    if principal.role is not Role.ADMIN and created_by != principal.user:
        raise Forbidden(f"{what} belongs to another user")


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing Authorization: Bearer <token>")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("Authorization must be 'Bearer <token>'")
    return token


async def authenticate(
    sessionmaker: async_sessionmaker[AsyncSession],
    token: str,
    *,
    oidc: OidcVerifier | None,
    now: datetime,
) -> Principal:
    if token.startswith(TOKEN_PREFIX) or oidc is None:
        return await _api_token_principal(sessionmaker, token, now)
    return await oidc.verify(token)


async def _api_token_principal(
    sessionmaker: async_sessionmaker[AsyncSession], token: str, now: datetime
) -> Principal:
    from app.models import ApiToken

    if not token.startswith(TOKEN_PREFIX) or len(token) > 256:
        raise Unauthenticated("unknown token")
    async with sessionmaker() as session:
        row = (
            await session.execute(
                select(
                    ApiToken.user, ApiToken.role, ApiToken.expires_at, ApiToken.revoked_at
                ).where(ApiToken.token_hash == hash_token(token))
            )
        ).first()
    # One message for unknown, expired and revoked: the caller learns nothing about which.
    if row is None or row.revoked_at is not None or (row.expires_at and row.expires_at <= now):
        raise Unauthenticated("unknown, expired or revoked token")
    return Principal(user=row.user, role=row.role)


def validate_user(user: str) -> str:
    user = user.strip()
    if not user or len(user) > USER_PATTERN_MAX or any(ord(char) < 32 for char in user):
        raise BadUserInput(f"user must be 1-{USER_PATTERN_MAX} printable characters")
    return user


async def create_token(
    session: AsyncSession,
    actor: Actor,
    *,
    user: str,
    role: Role,
    expires_in: timedelta | None,
    now: datetime,
) -> tuple[ApiToken, str]:
    """A new token; the secret is returned once and only its hash is stored."""
    from app.audit import record
    from app.models import ApiToken

    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        user=validate_user(user),
        role=role,
        token_hash=hash_token(secret),
        token_prefix=secret[: len(TOKEN_PREFIX) + 6],
        created_by=actor.principal.user,
        created_at=now,
        expires_at=now + expires_in if expires_in is not None else None,
    )
    session.add(token)
    await session.flush()
    await record(
        session,
        actor,
        "token.create",
        detail={"tokenId": token.id, "user": token.user, "role": role.value},
    )
    return token, secret


async def revoke_token(session: AsyncSession, actor: Actor, token_id: int, now: datetime) -> None:
    from app.audit import record
    from app.models import ApiToken

    result = await session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(ApiToken.user)
    )
    user = result.scalar_one_or_none()
    if user is None:
        raise NotFound(f"no active token with id {token_id}")
    await record(session, actor, "token.revoke", detail={"tokenId": token_id, "user": user})
