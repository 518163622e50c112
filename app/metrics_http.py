"""/metrics: the Prometheus exposition, for an ADMIN token, METRICS_TOKEN, or anyone on a
private network (METRICS_PUBLIC).

Several worker processes: set PROMETHEUS_MULTIPROC_DIR (an empty folder, emptied before each
start) in the environment of every worker; each then writes its samples there and /metrics,
served by any worker, aggregates them with prometheus-client's MultiProcessCollector.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from app.auth import authenticate, bearer_token
from app.config import Settings
from app.errors import AppError
from app.metrics import DATABASE_ERRORS, PREFIX, count_unexpected
from app.models import utcnow
from app.principals import Role
from app.state import services_of
from app.usage import UsageGrouping, UsageRow, storage_usage

log = logging.getLogger(__name__)


class _UsageCollector(Collector):
    """Storage usage by model, read from the database at scrape time (one GROUP BY)."""

    def __init__(self, rows: Iterable[UsageRow]) -> None:
        self._rows = list(rows)

    def collect(self) -> Iterator[Metric]:
        families = (
            (f"{PREFIX}_stored_bytes", "bytes of registered masks", "total_bytes"),
            (f"{PREFIX}_stored_objects", "registered mask objects", "object_count"),
            (f"{PREFIX}_mask_groups", "mask groups", "mask_group_count"),
        )
        for name, documentation, attribute in families:
            family = GaugeMetricFamily(name, documentation + " by model", labels=["model"])
            for row in self._rows:
                family.add_metric([row.key], float(getattr(row, attribute)))
            yield family


def _registry() -> CollectorRegistry:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


async def _allowed(request: Request, settings: Settings) -> Response | None:
    """None when the caller may read metrics, else the refusal."""
    if settings.metrics_public or settings.auth_disabled:
        return None
    authorization = request.headers.get("authorization")
    challenge = {"WWW-Authenticate": 'Bearer realm="pacs-masks metrics"'}
    try:
        token = bearer_token(authorization)
    except AppError as error:
        return PlainTextResponse(error.message, status_code=401, headers=challenge)
    if settings.metrics_token and hmac.compare_digest(
        token.encode("utf-8"), settings.metrics_token.encode("utf-8")
    ):
        return None
    services = services_of(request)
    try:
        principal = await authenticate(
            services.sessionmaker, token, oidc=services.oidc, now=utcnow()
        )
    except AppError as error:
        return PlainTextResponse(error.message, status_code=401, headers=challenge)
    except Exception as error:
        # The database (or the identity provider) is down: METRICS_TOKEN still works then.
        log.exception("metrics: cannot check the token")
        count_unexpected(error, "metrics")
        return PlainTextResponse("cannot check the token now", status_code=503)
    if not principal.role.allows(Role.ADMIN):
        return PlainTextResponse("metrics need an ADMIN token or METRICS_TOKEN", status_code=403)
    return None


async def metrics_endpoint(request: Request) -> Response:
    services = services_of(request)
    refusal = await _allowed(request, services.settings)
    if refusal is not None:
        return refusal
    body = generate_latest(_registry())
    try:
        async with services.sessionmaker() as session:
            rows = await storage_usage(session, UsageGrouping.MODEL)
    except SQLAlchemyError:
        # The request metrics still help most when the database is the thing that is down.
        log.exception("metrics: storage usage unavailable")
        DATABASE_ERRORS.labels("metrics").inc()
    else:
        usage = CollectorRegistry(auto_describe=False)
        usage.register(_UsageCollector(rows))
        body += generate_latest(usage)
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
