"""Who is calling: one way to authenticate an HTTP request, for every route that needs it."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request

from app.errors import AppError, Unauthenticated
from app.metrics import count_unexpected
from app.models import utcnow
from app.oidc import OidcVerifier
from app.principals import ANONYMOUS_ADMIN, Principal
from app.state import request_id_of, services_of
from app.tokens import TokenCache, is_api_token, token_principal

logger = logging.getLogger(__name__)

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pacs-masks"'}


class AuthenticationUnavailable(AppError):
    """Authentication itself failed (database or IdP code raised): the caller gets the id."""

    code = "INTERNAL_SERVER_ERROR"

    def __init__(self, request_id: str) -> None:
        super().__init__("Internal server error", requestId=request_id)


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
    tokens: TokenCache | None = None,
) -> Principal:
    if is_api_token(token) or oidc is None:
        # The session opens a connection only when the token is not in `tokens`.
        async with sessionmaker() as session:
            return await token_principal(session, token, now, tokens)
    return await oidc.verify(token)


async def authenticate_request(request: Request) -> Principal:
    """The caller of `request`; raises Unauthenticated (answer 401 with CHALLENGE) or
    AuthenticationUnavailable (answer 500)."""
    services = services_of(request)
    if services.settings.auth_disabled:
        return ANONYMOUS_ADMIN
    token = bearer_token(request.headers.get("authorization"))
    try:
        principal = await authenticate(
            services.sessionmaker, token, oidc=services.oidc, now=utcnow(), tokens=services.tokens
        )
    except AppError:
        raise
    except Exception as error:
        count_unexpected(error, "authentication")
        request_id = request_id_of(request)
        logger.exception("authentication failed (request %s)", request_id)
        raise AuthenticationUnavailable(request_id) from error
    request.state.user = principal.user  # for the request log
    return principal
