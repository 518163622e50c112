"""API tokens: created and revoked with an audit record, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import Actor, record
from app.errors import BadUserInput, NotFound, Unauthenticated
from app.models import ApiToken
from app.principals import USER_NAME_MAX, Principal, Role, usable_user_name

TOKEN_PREFIX = "pmk_"
MAX_TOKEN_LENGTH = 256


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def is_api_token(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX)


async def token_principal(
    session: AsyncSession, token: str, now: datetime, cache: TokenCache | None = None
) -> Principal:
    if not is_api_token(token) or len(token) > MAX_TOKEN_LENGTH:
        raise Unauthenticated("unknown token")
    token_hash = hash_token(token)
    if cache is not None:
        kept = cache.get(token_hash, now)
        if kept is not None:
            return kept
    row = (
        await session.execute(
            select(ApiToken.user, ApiToken.role, ApiToken.expires_at, ApiToken.revoked_at).where(
                ApiToken.token_hash == token_hash
            )
        )
    ).first()
    # One message for unknown, expired and revoked: the caller learns nothing about which.
    if row is None or row.revoked_at is not None or (row.expires_at and row.expires_at <= now):
        raise Unauthenticated("unknown, expired or revoked token")
    principal = Principal(user=row.user, role=row.role)
    if cache is not None:
        cache.keep(token_hash, principal, row.expires_at, now)
    return principal


class TokenCache:
    """Principals of the API tokens a process found valid in the last `seconds`
    (TOKEN_CACHE_SECONDS), by token hash: a viewer sends the same token many times a second.
    Revocation happens in the database (`pacs-masks revoke-token`), so a revoked token stays
    usable on each process for at most `seconds` after it; a token is never used past its
    expiry. Unknown, expired and revoked tokens are never kept, so a guessed token costs a
    lookup every time. Written by hand: the entry's lifetime depends on the token's expiry
    and on the caller's `now`, which no off-the-shelf TTL cache takes."""

    MAX_ENTRIES = 10_000

    def __init__(self, seconds: float) -> None:
        self.lifetime = timedelta(seconds=seconds)
        self._entries: dict[str, tuple[Principal, datetime]] = {}

    def get(self, token_hash: str, now: datetime) -> Principal | None:
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        principal, until = entry
        if now >= until:
            del self._entries[token_hash]
            return None
        return principal

    def keep(
        self, token_hash: str, principal: Principal, expires_at: datetime | None, now: datetime
    ) -> None:
        if not self.lifetime:
            return
        until = now + self.lifetime
        if expires_at is not None:
            until = min(until, expires_at)
        if len(self._entries) >= self.MAX_ENTRIES:
            # Many distinct tokens at once is unusual: start afresh rather than track age.
            self._entries.clear()
        self._entries[token_hash] = (principal, until)


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
    stored_user = usable_user_name(user)
    if stored_user is None:
        raise BadUserInput(f"user must be 1-{USER_NAME_MAX} printable characters")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        user=stored_user,
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


async def list_tokens(session: AsyncSession) -> Sequence[ApiToken]:
    return (await session.scalars(select(ApiToken).order_by(ApiToken.id))).all()


async def count_tokens(session: AsyncSession) -> int:
    return await session.scalar(select(func.count()).select_from(ApiToken)) or 0
