"""What the service measures (prometheus-client); app.metrics_http serves it at /metrics.

Labels stay bounded: GraphQL operations are labelled by their root fields (schema names), not by
the client-chosen operationName; HTTP requests by route template, never by path.
"""

from __future__ import annotations

from collections.abc import Sequence

from graphql import DocumentNode, FieldNode, OperationDefinitionNode, get_operation_ast
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

PREFIX = "pacs_masks"
# Latency buckets from a 5 ms query to a 30 s completion of thousands of slices.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_ROOT_FIELDS_IN_LABEL = 3
UNMATCHED_ROUTE = "(unmatched)"

HTTP_REQUESTS = Counter(
    f"{PREFIX}_http_requests", "HTTP requests by route template", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "HTTP request duration by route template",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
GRAPHQL_REQUESTS = Counter(
    f"{PREFIX}_graphql_requests",
    "GraphQL requests by operation (its root fields) and outcome",
    ["operation", "outcome"],
)
GRAPHQL_LATENCY = Histogram(
    f"{PREFIX}_graphql_request_duration_seconds",
    "GraphQL request duration by operation (its root fields)",
    ["operation"],
    buckets=LATENCY_BUCKETS,
)
GRAPHQL_ERRORS = Counter(
    f"{PREFIX}_graphql_errors", "GraphQL errors by root field and code", ["field", "code"]
)
COMPLETION_FAILURES = Counter(
    f"{PREFIX}_completion_failures", "completeMaskUpload calls refused, by code", ["code"]
)
UPLOAD_URLS = Counter(f"{PREFIX}_upload_urls_issued", "presigned PUT URLs issued")
SLICES_COMPLETED = Counter(
    f"{PREFIX}_slices_completed", "masks registered after verification in storage"
)
BYTES_REGISTERED = Counter(f"{PREFIX}_bytes_registered", "bytes of the masks registered")
AUDITED_ACTIONS = Counter(f"{PREFIX}_actions", "committed audited actions", ["action"])
STORAGE_ERRORS = Counter(
    f"{PREFIX}_storage_errors", "storage unreachable or refusing, by where", ["where"]
)
DATABASE_ERRORS = Counter(f"{PREFIX}_database_errors", "database errors, by where", ["where"])
SWEEPS = Counter(f"{PREFIX}_sweeps", "storage sweeps run (dry runs not counted)")
SWEPT_OBJECTS = Counter(f"{PREFIX}_swept_objects", "objects the sweeper removed, by kind", ["kind"])
SWEPT_BYTES = Counter(f"{PREFIX}_swept_bytes", "bytes the sweeper removed, by kind", ["kind"])
SWEEP_ERRORS = Counter(f"{PREFIX}_sweep_errors", "storage errors met by the sweeper")
# Under `serve --workers N` one series per live worker process (a `pid` label): operators see
# how the viewers spread over the workers; sum() gives the service's total.
LIVE_SUBSCRIBERS = Gauge(
    f"{PREFIX}_live_subscribers",
    "live mask group event subscriptions open",
    multiprocess_mode="liveall",
)

# What committed audited actions add to the counters: (action, slice counter, byte counter).
_ACTION_COUNTERS = {
    "upload_urls.issue": (UPLOAD_URLS, None),
    "upload.complete": (SLICES_COMPLETED, BYTES_REGISTERED),
}
_PENDING_KEY = "pacs_masks_metrics_pending"


def count_on_commit(
    session: AsyncSession, action: str, slice_count: int | None, byte_count: int | None
) -> None:
    """Counts an audited action once its transaction commits; a rollback counts nothing."""
    session.info.setdefault(_PENDING_KEY, []).append((action, slice_count, byte_count))


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    for action, slice_count, byte_count in session.info.pop(_PENDING_KEY, ()):
        AUDITED_ACTIONS.labels(action).inc()
        slices, size = _ACTION_COUNTERS.get(action, (None, None))
        if slices is not None and slice_count:
            slices.inc(slice_count)
        if size is not None and byte_count:
            size.inc(byte_count)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)


def operation_label(document: DocumentNode | None, operation_name: str | None) -> str:
    """'mutation:completeMaskUpload', 'query:annotation,me'; bounded by the schema's fields."""
    operation = get_operation_ast(document, operation_name) if document is not None else None
    if not isinstance(operation, OperationDefinitionNode):
        return "invalid"
    names = sorted(
        {
            selection.name.value
            for selection in operation.selection_set.selections
            if isinstance(selection, FieldNode)
        }
    )
    if not names:
        fields = "fragment"
    elif len(names) > MAX_ROOT_FIELDS_IN_LABEL:
        fields = "several"
    else:
        fields = ",".join(names)
    return f"{operation.operation.value}:{fields}"


def observe_request(
    route: str,
    method: str,
    status: int,
    seconds: float,
    operation: str | None,
    errors: Sequence[tuple[str, str]],
) -> None:
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_LATENCY.labels(route, method).observe(seconds)
    if operation is None:
        return
    GRAPHQL_REQUESTS.labels(operation, "error" if errors else "ok").inc()
    GRAPHQL_LATENCY.labels(operation).observe(seconds)
    for field, code in errors:
        GRAPHQL_ERRORS.labels(field, code).inc()
        if field == "completeMaskUpload":
            COMPLETION_FAILURES.labels(code).inc()
        if code == "STORAGE_UNAVAILABLE":
            STORAGE_ERRORS.labels(field).inc()


def count_unexpected(error: BaseException | None, where: str) -> None:
    """Counts an unexpected error that came from the database. Storage errors never get here
    (they become STORAGE_UNAVAILABLE); a bare OSError is the driver failing to connect."""
    if isinstance(error, SQLAlchemyError | OSError):
        DATABASE_ERRORS.labels(where).inc()


def count_sweep(deleted: tuple[int, int], debris: tuple[int, int], errors: int) -> None:
    """One finished sweep: (objects, bytes) of deleted groups and of upload debris."""
    SWEEPS.inc()
    for kind, (objects, size) in (("deleted_group", deleted), ("debris", debris)):
        SWEPT_OBJECTS.labels(kind).inc(objects)
        SWEPT_BYTES.labels(kind).inc(size)
    SWEEP_ERRORS.inc(errors)
