"""/graphql over HTTP (GraphQL-over-HTTP spec): POST JSON, GET queries, GraphiQL for browsers.

Written on Starlette directly rather than strawberry.asgi so that media types, status codes,
error codes and request ids follow our contract."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from graphql import (
    DocumentNode,
    GraphQLError,
    OperationDefinitionNode,
    OperationType,
    get_operation_ast,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from app.audit import Actor
from app.auth import CHALLENGE, AuthenticationUnavailable, authenticate_request
from app.errors import AppError, BadUserInput, StorageUnavailable, Unauthenticated
from app.graphql.context import Context
from app.graphql.cost import QueryCost
from app.graphql.documents import Admitted, DocumentCache
from app.graphql.encoded import as_fragment, as_python
from app.graphql.schema import Schema
from app.graphql.variables import check_list_lengths, check_text
from app.metrics import count_unexpected, operation_label
from app.state import request_id_of, services_of
from app.static_routes import graphiql_page
from app.storage import StorageError

logger = logging.getLogger("app.graphql")

# The "field" of errors that refuse the request as a whole, in metrics.
REQUEST_FIELD = "(request)"
JSON_MEDIA = "application/json"
GRAPHQL_RESPONSE_MEDIA = "application/graphql-response+json"


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _accepted_media(request: Request) -> str | None:
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return JSON_MEDIA
    ranked: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept.split(",")):
        media, *params = (item.strip() for item in part.split(";"))
        quality = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        if quality > 0:
            ranked.append((-quality, position, media.lower()))
    for _, _, media in sorted(ranked):
        if media == GRAPHQL_RESPONSE_MEDIA:
            return GRAPHQL_RESPONSE_MEDIA
        if media in (JSON_MEDIA, "application/*", "*/*"):
            return JSON_MEDIA
    return None


async def _read_params(request: Request, max_bytes: int) -> dict[str, Any]:
    if request.method == "GET":
        params: dict[str, Any] = dict(request.query_params)
        for name in ("variables", "extensions"):
            if params.get(name):
                params[name] = _json(params[name], name)
        return params
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != JSON_MEDIA:
        raise RequestError(415, "POST requests must have Content-Type: application/json")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise RequestError(413, f"request body exceeds {max_bytes} bytes")
    params = _json(body, "request body")
    if not isinstance(params, dict):
        raise RequestError(400, "request body must be a JSON object")
    return params


def _json(text: str | bytes | bytearray, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise RequestError(400, f"{what} is not valid JSON") from error
    except RecursionError as error:  # json nests by recursion: thousands of [[[[ exhaust it
        raise RequestError(400, f"{what} is nested too deeply") from error


def format_error(error: GraphQLError, request_id: str) -> dict[str, Any]:
    original = error.original_error
    if isinstance(original, StorageError):
        original = StorageUnavailable(f"storage is unavailable: {original}")
    formatted: dict[str, Any] = {"message": error.message}
    if error.locations:
        formatted["locations"] = [
            {"line": loc.line, "column": loc.column} for loc in error.locations
        ]
    if error.path:
        formatted["path"] = error.path
    if isinstance(original, AppError):
        formatted["message"] = original.message
        formatted["extensions"] = original.extensions
    elif error.path is None:
        # No path: the request itself was refused (syntax, validation, variable coercion).
        formatted["extensions"] = {"code": "BAD_USER_INPUT"}
    else:
        # Internals (SQL, stack, paths) stay in our log; the client gets the id to quote.
        count_unexpected(original, str(error.path[0]))
        logger.error(
            "unexpected error in %s (request %s)",
            ".".join(str(part) for part in error.path or []) or "operation",
            request_id,
            exc_info=original,
        )
        formatted["message"] = "Internal server error"
        formatted["extensions"] = {"code": "INTERNAL_SERVER_ERROR", "requestId": request_id}
    return formatted


Endpoint = Callable[[Request], Awaitable[Response]]


def graphql_endpoint(schema: Schema, query_cost: QueryCost, documents: DocumentCache) -> Endpoint:
    """`schema` must run app.graphql.documents.PreparedDocument (create_app's does)."""

    async def endpoint(request: Request) -> Response:
        return await _serve_graphql(schema, query_cost, documents, request)

    return endpoint


async def _serve_graphql(
    schema: Schema, query_cost: QueryCost, documents: DocumentCache, request: Request
) -> Response:
    services = services_of(request)
    request_id = request_id_of(request)
    settings = services.settings
    if (
        request.method == "GET"
        and "text/html" in request.headers.get("accept", "")
        and ("query" not in request.query_params)
    ):
        if not settings.graphiql:
            return PlainTextResponse("GraphiQL is switched off", status_code=404)
        return graphiql_page(settings)
    # Until the document is parsed, a refused request counts as an invalid operation.
    request.state.operation = operation_label(None, None)
    media = _accepted_media(request)
    if media is None:
        return JSONResponse(
            {
                "errors": [
                    {"message": f"Accept must allow application/json or {GRAPHQL_RESPONSE_MEDIA}"}
                ]
            },
            status_code=406,
        )
    try:
        params = await _read_params(request, settings.max_request_bytes)
        query = params.get("query")
        variables = params.get("variables")
        operation_name = params.get("operationName")
        if not isinstance(query, str) or not query.strip():
            raise RequestError(400, "query must be a non-empty string")
        if variables is not None and not isinstance(variables, dict):
            raise RequestError(400, "variables must be a JSON object")
        if operation_name is not None and not isinstance(operation_name, str):
            raise RequestError(400, "operationName must be a string")
        # Structure first: an abusive query costs a parse, not a token lookup or a query.
        admitted: Admitted | None = documents.admit(query)
        document = admitted.document if admitted is not None else None
        if document is not None:
            operation = _operation(document, operation_name)
            if request.method == "GET" and operation.operation is not OperationType.QUERY:
                raise RequestError(405, "only queries may be sent with GET", {"Allow": "POST"})
            check_list_lengths(operation, variables, max_items=settings.max_slices_per_call)
            check_text(query, document, variables)
            query_cost.check(document, operation, variables, limit=settings.max_query_cost)
        request.state.operation = operation_label(document, operation_name)
        principal = await authenticate_request(request)
    except RequestError as error:
        request.state.graphql_errors = [(REQUEST_FIELD, "BAD_USER_INPUT")]
        return _respond(
            {"errors": [{"message": error.message, "extensions": {"code": "BAD_USER_INPUT"}}]},
            error.status,
            media,
            error.headers,
        )
    except AppError as error:
        request.state.graphql_errors = [(REQUEST_FIELD, error.code)]
        status = 400
        if isinstance(error, Unauthenticated):
            status = 401
        elif isinstance(error, AuthenticationUnavailable):
            status = 500
        headers = CHALLENGE if status == 401 else None
        return _respond(
            {"errors": [{"message": error.message, "extensions": error.extensions}]},
            status,
            media,
            headers,
        )

    client = request.client
    context = Context(
        settings=settings,
        sessionmaker=services.sessionmaker,
        reads=services.reads,
        storage=services.storage,
        jobs=services.jobs,
        actor=Actor(
            principal=principal,
            request_id=request_id,
            client_ip=client.host if client else None,
            user_agent=request.headers.get("user-agent"),
        ),
        events=services.events,
        view_urls=services.view_urls,
        admitted=admitted,
    )
    result = await schema.execute(
        query, variable_values=variables, context_value=context, operation_name=operation_name
    )
    payload: dict[str, Any] = {}
    if result.errors:
        payload["errors"] = [format_error(error, request_id) for error in result.errors]
    is_request_error = result.data is None and all(
        error.path is None for error in result.errors or []
    )
    if not is_request_error:
        payload["data"] = result.data
    else:
        request.state.operation = operation_label(None, None)
    request.state.graphql_errors = [
        (str((error.get("path") or [REQUEST_FIELD])[0]), error["extensions"]["code"])
        for error in payload.get("errors", ())
    ]
    status = 400 if is_request_error and media == GRAPHQL_RESPONSE_MEDIA else 200
    return _respond(payload, status, media)


def _operation(document: DocumentNode, operation_name: str | None) -> OperationDefinitionNode:
    operation = get_operation_ast(document, operation_name)
    if operation is not None:
        return operation
    if operation_name is not None:
        raise BadUserInput(f"the document has no operation named {operation_name[:100]!r}")
    raise BadUserInput("the document has several operations: operationName must name one")


def _respond(
    payload: dict[str, Any], status: int, media: str, headers: dict[str, str] | None = None
) -> Response:
    # Answers hold patient data: no shared or browser cache keeps them.
    return Response(
        _encode(payload),
        status_code=status,
        media_type=media,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def _encode(payload: dict[str, Any]) -> bytes:
    """orjson writes UTF-8 bytes in one C pass: for big trees the standard encoder's chunk
    list was the server's peak memory and a third of its time. What orjson refuses (integers
    past 64 bits, in a JSON scalar say) goes through the standard encoder, as before."""
    try:
        return orjson.dumps(payload, default=as_fragment)
    except TypeError:
        return json.dumps(
            payload, separators=(",", ":"), ensure_ascii=False, default=as_python
        ).encode()
