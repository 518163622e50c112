from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import func, select, text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import DisableIntrospection

from app.access import AccessMiddleware
from app.auth import authenticate, bearer_token
from app.config import Settings
from app.db import create_engine, create_sessionmaker
from app.errors import Unauthenticated
from app.graphql.schema import create_schema
from app.graphql.view import graphql_endpoint
from app.metrics import DATABASE_ERRORS, STORAGE_ERRORS
from app.metrics_http import metrics_endpoint
from app.models import Mask, utcnow
from app.oidc import OidcConfig, OidcVerifier
from app.storage import LABEL_PATTERN, Storage, StorageError, create_storage

logger = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Gives every request an id (the caller's X-Request-ID if sane) for logs and errors, and
    reports the server's own time in Server-Timing so clients can tell it from the network."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed_ms = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                headers.append((b"server-timing", f"app;dur={elapsed_ms:.1f}".encode("latin-1")))
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    try:
        async with request.app.state.sessionmaker() as session:
            await session.execute(text("SELECT 1"))
    except Exception:
        logger.exception("readiness: database unreachable")
        DATABASE_ERRORS.labels("readyz").inc()
        return PlainTextResponse("database unreachable", status_code=503)
    return PlainTextResponse("ready")


async def view_mask(request: Request) -> Response:
    """Streams one stored mask image through the server (same-origin for the viewer)."""
    settings: Settings = request.app.state.settings
    if not settings.auth_disabled:
        try:
            principal = await authenticate(
                request.app.state.sessionmaker,
                bearer_token(request.headers.get("authorization")),
                oidc=request.app.state.oidc,
                now=utcnow(),
            )
        except Unauthenticated as error:
            return PlainTextResponse(
                error.message,
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="pacs-masks"'},
            )
        request.state.user = principal.user
    group_id = request.path_params["group_id"]
    slice_param = request.query_params.get("slice", "")
    label = request.query_params.get("label") or None
    if not slice_param.isdigit() or (label is not None and not LABEL_PATTERN.match(label)):
        return PlainTextResponse("slice must be a non-negative integer", status_code=400)
    statement = select(Mask.file_path, Mask.mime_type, Mask.checksum).where(
        Mask.mask_group_id == group_id,
        Mask.slice_index == int(slice_param),
        func.coalesce(Mask.label_name, "") == (label or ""),
    )
    async with request.app.state.sessionmaker() as session:
        row = (await session.execute(statement)).first()
    if row is None:
        return PlainTextResponse("no such mask", status_code=404)
    etag = f'"{row.checksum.removeprefix("md5:")}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    storage: Storage = request.app.state.storage
    try:
        stream = await storage.open(row.file_path)
    except StorageError:
        logger.exception("view: storage unavailable for %s", row.file_path)
        STORAGE_ERRORS.labels("view").inc()
        return PlainTextResponse("storage unavailable", status_code=503)
    if stream is None:
        return PlainTextResponse("object missing from storage", status_code=404)
    headers["Content-Length"] = str(stream.size)
    return StreamingResponse(stream.chunks, media_type=row.mime_type, headers=headers)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    local_storage = None
    routes = [
        Route("/graphql", graphql_endpoint, methods=["GET", "POST"]),
        Route("/api/mask-group/{group_id:int}/view", view_mask, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    if settings.storage_provider == "local":
        from app.local_storage import LocalStorage

        local_storage = LocalStorage.from_settings(settings)
        routes.extend(local_storage.routes())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = create_engine(settings.resolved_database_url)
        storage = local_storage or await create_storage(settings)
        app.state.engine = engine
        app.state.sessionmaker = create_sessionmaker(engine)
        app.state.storage = storage
        try:
            yield
        finally:
            await storage.aclose()
            await engine.dispose()

    middleware = [Middleware(RequestIdMiddleware), Middleware(AccessMiddleware)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                # PUT and Content-MD5: browsers upload to the local backend's signed URLs.
                allow_methods=["GET", "POST", "PUT", "HEAD"],
                allow_headers=["Authorization", "Content-Type", "Content-MD5", "X-Request-ID"],
                expose_headers=["X-Request-ID", "ETag", "Server-Timing"],
            )
        )
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.settings = settings
    oidc_config = OidcConfig.from_settings(settings)
    app.state.oidc = OidcVerifier.from_config(oidc_config) if oidc_config else None
    extensions = [] if settings.graphql_introspection else [DisableIntrospection]
    app.state.schema = create_schema(extensions=extensions)
    return app
