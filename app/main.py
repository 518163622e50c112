"""The composition root: `create_app` builds every resource once, in the lifespan, and hands
it to the handlers as typed lifespan state (`app.state.Services`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route, WebSocketRoute
from strawberry.extensions import DisableIntrospection
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app.access import AccessMiddleware
from app.config import Settings
from app.db import create_engine, create_read_sessionmaker, create_sessionmaker
from app.dicom import routes as dicom_routes
from app.dicom.export import EXPORT_JOB, export_job
from app.events import create_event_bus
from app.gc_tuning import tune_gc
from app.graphql.cost import QueryCost
from app.graphql.documents import DocumentCache, PreparedDocument
from app.graphql.live import LiveGraphQL
from app.graphql.schema import create_schema
from app.graphql.view import graphql_endpoint
from app.jobs import Job, JobContext, JobRunner, owner_name
from app.local_storage import ROUTE_METHODS, ROUTE_PATH, LocalStorage
from app.metrics_http import metrics_endpoint
from app.oidc import OidcConfig, OidcVerifier
from app.routes import healthz, local_object, readyz, view_mask
from app.s3 import S3Storage
from app.slow_clients import BodyDeadlineMiddleware, header_deadline_protocol
from app.state import LifespanState, Services
from app.static_routes import static_routes
from app.storage import Storage
from app.sweeper import sweep_job
from app.tokens import TokenCache
from app.validation_job import validation_job
from app.view_urls import ViewUrlSigner
from app.warmup import warm_up

# Background jobs every `serve` runs (see app.jobs): name, function, on/off and interval setting.
JOBS = [
    Job("storage-cleanup", sweep_job, "cleanup_enabled", "cleanup_interval_seconds"),
    Job("validation", validation_job, "validation_enabled", "validation_interval_seconds"),
    # A short lease: a replica that dies mid-export must not hold the others off for long,
    # and two runs at once are harmless (each export row is claimed by one run only).
    Job(
        EXPORT_JOB,
        export_job,
        "dicom_export_enabled",
        "dicom_export_interval_seconds",
        lease_seconds=120,
    ),
]


async def open_storage(settings: Settings) -> Storage:
    """The storage backend the settings name; the caller closes it (`aclose`)."""
    if settings.storage_provider == "local":
        return LocalStorage.from_settings(settings)
    return await S3Storage.from_settings(settings)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn must run the app, for `serve` and the tests alike: forwarded headers are
    applied by create_app from FORWARDED_ALLOW_IPS only (uvicorn's own default would believe
    any local peer), and request headers have a deadline."""
    return {
        "proxy_headers": False,
        "http": header_deadline_protocol(settings.request_header_timeout),
    }


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    extensions: list[Any] = [PreparedDocument]
    if not settings.graphql_introspection:
        extensions.append(DisableIntrospection)
    schema = create_schema(extensions=extensions)
    query_cost = QueryCost(schema._schema, max_slices_per_call=settings.max_slices_per_call)
    documents = DocumentCache(
        size=settings.graphql_document_cache_size,
        max_tokens=settings.max_query_tokens,
        max_depth=settings.max_query_depth,
        max_aliases=settings.max_query_aliases,
    )
    routes = [
        Route("/graphql", graphql_endpoint(schema, query_cost, documents), methods=["GET", "POST"]),
        WebSocketRoute("/graphql", LiveGraphQL(schema, settings, query_cost)),
        Route("/api/mask-group/{group_id:int}/view", view_mask, methods=["GET"]),
        *dicom_routes.ROUTES,
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *static_routes(settings),
    ]
    if settings.storage_provider == "local":
        routes.append(Route(ROUTE_PATH, local_object, methods=ROUTE_METHODS))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[LifespanState]:
        oidc_config = OidcConfig.from_settings(settings)
        oidc = OidcVerifier.from_config(oidc_config) if oidc_config else None
        engine = create_engine(settings.resolved_database_url)
        events = create_event_bus(engine)
        try:
            storage = await open_storage(settings)
            await events.start()
            sessionmaker = create_sessionmaker(engine)
            context = JobContext(settings, sessionmaker, storage, owner_name(), events)
            runner = JobRunner(context, JOBS)
            runner.start()
            await warm_up(schema, settings, sessionmaker, storage, runner, events)
            restore_gc = tune_gc(settings.gc_tuning)
            try:
                yield {
                    "services": Services(
                        settings=settings,
                        engine=engine,
                        sessionmaker=sessionmaker,
                        reads=create_read_sessionmaker(engine),
                        storage=storage,
                        oidc=oidc,
                        jobs=runner,
                        events=events,
                        view_urls=ViewUrlSigner.from_settings(settings),
                        tokens=TokenCache(settings.token_cache_seconds),
                    )
                }
            finally:
                restore_gc()
                await runner.stop()
                await events.aclose()
                await storage.aclose()
        finally:
            await engine.dispose()

    middleware = [
        Middleware(AccessMiddleware),
        Middleware(BodyDeadlineMiddleware, timeout=settings.request_body_timeout),
    ]
    if settings.forwarded_allow_ips:
        # uvicorn's own rule, applied here whatever server runs the app: the peer's address
        # (and so the audit clientIp) is replaced only for these proxies.
        middleware.insert(
            0, Middleware(ProxyHeadersMiddleware, trusted_hosts=settings.forwarded_allow_ips)
        )
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
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
