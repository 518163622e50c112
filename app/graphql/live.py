"""Live events: `Subscription.maskGroupEvents` over graphql-transport-ws on /graphql.

The socket is authenticated once, by the `connection_init` payload's
`{"Authorization": "Bearer ..."}` (browsers cannot set headers on a WebSocket) or else the
upgrade request's Authorization header; a refused connection_init closes with 4403, a
subscribe before it with 4401 (the protocol's codes). Only subscriptions run over the socket,
after the same admission checks as /graphql (structure, list lengths, text, cost); queries
and mutations use HTTP."""

from __future__ import annotations

import dataclasses
import enum
import logging
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import strawberry
from graphql import GraphQLError, OperationType, get_operation_ast
from sqlalchemy import select
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import SubscribeMessage
from strawberry.types.unset import UnsetType

from app import events, models
from app.audit import Actor
from app.auth import authenticate, bearer_token
from app.config import Settings
from app.errors import AppError, BadUserInput, Conflict, NotFound
from app.graphql.context import Context, Info
from app.graphql.cost import QueryCost
from app.graphql.limits import check_document
from app.graphql.types import MaskGroupStatus
from app.graphql.variables import check_list_lengths, check_text
from app.models import utcnow
from app.oidc import OidcVerifier
from app.principals import ANONYMOUS_ADMIN, Principal, Role, require
from app.state import services_of
from app.validation import parse_id

logger = logging.getLogger("app.graphql")

# Until connection_init is accepted nothing runs (the protocol closes a subscribe with 4401);
# this principal is replaced by the authenticated one before the acknowledgement.
NOT_YET_AUTHENTICATED = Principal(user="", role=Role.READER)


@strawberry.enum
class MaskGroupEventKind(enum.Enum):
    CREATED = strawberry.enum_value("CREATED", description="the group was created")
    SLICES_COMPLETED = strawberry.enum_value(
        "SLICES_COMPLETED", description="a completeMaskUpload call registered slices"
    )
    DELETED = strawberry.enum_value("DELETED", description="the group and its masks are gone")
    VALIDATED = strawberry.enum_value(
        "VALIDATED", description="the validation job finished checking the group"
    )


@strawberry.type
class MaskGroupEvent:
    kind: MaskGroupEventKind
    annotation_id: strawberry.ID
    mask_group_id: strawberry.ID
    slice_count: int
    uploaded_slice_count: int
    status: MaskGroupStatus
    occurred_at: datetime

    @classmethod
    def from_event(cls, item: events.MaskGroupEvent) -> MaskGroupEvent:
        return cls(
            kind=MaskGroupEventKind[item.kind.name],
            annotation_id=strawberry.ID(str(item.annotation_id)),
            mask_group_id=strawberry.ID(str(item.mask_group_id)),
            slice_count=item.slice_count,
            uploaded_slice_count=item.uploaded_slice_count,
            status=MaskGroupStatus[models.MaskGroupStatus(item.status).name],
            occurred_at=item.occurred_at,
        )


class InternalError(AppError):
    def __init__(self, request_id: str) -> None:
        super().__init__("Internal server error", requestId=request_id)


class EventsDropped(Conflict):
    def __init__(self, message: str) -> None:
        # resync: the client reads the annotation again and subscribes again.
        super().__init__(message, resync=True)


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="every change to the mask groups of one annotation, from any replica, as "
        "it happens. A subscriber that falls behind gets a CONFLICT error with "
        "extensions.resync = true instead of the events it missed: read the state again and "
        "subscribe again."
    )
    async def mask_group_events(
        self, info: Info, annotation_id: strawberry.ID
    ) -> AsyncGenerator[MaskGroupEvent, None]:
        context = info.context
        require(context.principal, Role.READER)
        annotation = parse_id("annotationId", annotation_id)
        try:
            # Not the connection-long loader: its cache would outlive a deleted annotation.
            async with context.sessionmaker() as session:
                found = await session.scalar(
                    select(models.Annotation.id).where(models.Annotation.id == annotation)
                )
            if found is None:
                raise NotFound(f"annotation {annotation} does not exist", field="annotationId")
            async with context.events.subscribe(annotation) as stream:
                async for item in stream:
                    yield MaskGroupEvent.from_event(item)
        except events.EventsDropped as error:
            raise EventsDropped(str(error)) from error
        except AppError:
            raise
        except Exception as error:
            request_id = context.actor.request_id or ""
            logger.exception("subscription failed (connection %s)", request_id)
            raise InternalError(request_id) from error


@dataclass
class LiveContext(Context):
    """One per WebSocket connection; its actor is set when connection_init is accepted."""

    websocket: WebSocket = field(kw_only=True)
    oidc: OidcVerifier | None = field(kw_only=True)
    query_cost: QueryCost = field(kw_only=True)
    connection_params: dict[str, Any] = field(default_factory=dict)

    @property
    def connection_id(self) -> str:
        return self.actor.request_id or ""


class _TransportWSHandler(BaseGraphQLTransportWSHandler[LiveContext, None]):
    async def send_message(self, message: Any) -> None:
        # Errors follow /graphql's rules: a request error without a code is BAD_USER_INPUT;
        # an unexpected failure in execution reaches the client only as its request id.
        if message.get("type") == "error":
            for error in message["payload"]:
                error.setdefault("extensions", {}).setdefault("code", "BAD_USER_INPUT")
        elif message.get("type") == "next":
            for error in message["payload"].get("errors", ()):
                if "code" not in error.get("extensions", {}):
                    logger.error(
                        "unexpected error in a subscription result (connection %s): %s",
                        self.context.connection_id,
                        error.get("message"),
                    )
                    error["message"] = "Internal server error"
                    error["extensions"] = {
                        "code": "INTERNAL_SERVER_ERROR",
                        "requestId": self.context.connection_id,
                    }
        await super().send_message(message)

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        if self.connection_acknowledged:
            payload = message.get("payload")
            if not isinstance(payload, dict):
                await self.handle_invalid_message("subscribe needs a payload object")
                return
            refusal = self._refusal(payload)
            if refusal is not None:
                error = GraphQLError(refusal.message, extensions=refusal.extensions)
                await self.send_message(
                    {"id": message["id"], "type": "error", "payload": [error.formatted]}
                )
                return
        await super().handle_subscribe(message)

    def _refusal(self, payload: Mapping[str, Any]) -> AppError | None:
        settings = self.context.settings
        query = payload.get("query")
        if not isinstance(query, str):
            return BadUserInput("query must be a string")
        try:
            document = check_document(
                query,
                max_tokens=settings.max_query_tokens,
                max_depth=settings.max_query_depth,
                max_aliases=settings.max_query_aliases,
            )
        except AppError as error:
            return error
        operation_name = payload.get("operationName")
        if document is not None:
            operation = get_operation_ast(
                document, operation_name if isinstance(operation_name, str) else None
            )
            if operation is not None and operation.operation is not OperationType.SUBSCRIPTION:
                return BadUserInput("only subscriptions run over the WebSocket; use POST /graphql")
            if operation is not None:
                # The same admission as POST /graphql (app/graphql/view.py), before execution.
                variables = payload.get("variables")
                if variables is not None and not isinstance(variables, dict):
                    return BadUserInput("variables must be an object")
                try:
                    check_list_lengths(operation, variables, max_items=settings.max_slices_per_call)
                    check_text(query, document, variables)
                    self.context.query_cost.check(
                        document, operation, variables, limit=settings.max_query_cost
                    )
                except AppError as error:
                    return error
        return None


class LiveGraphQL(GraphQL[LiveContext, None]):
    """Strawberry's ASGI app, for the WebSocket half of /graphql only."""

    graphql_transport_ws_handler_class = _TransportWSHandler

    def __init__(self, schema: Any, settings: Settings, query_cost: QueryCost) -> None:
        self.query_cost = query_cost
        super().__init__(
            schema,
            graphql_ide=None,
            subscription_protocols=[GRAPHQL_TRANSPORT_WS_PROTOCOL],
            connection_init_wait_timeout=timedelta(seconds=10),
            max_subscriptions_per_connection=20,
            # Cross-site pages may not open a socket (the handshake carries cookies).
            allowed_origins=settings.cors_origins,
        )

    async def get_context(self, request: Any, response: Any) -> LiveContext:
        websocket: WebSocket = request
        services = services_of(websocket)
        client = websocket.client
        return LiveContext(
            settings=services.settings,
            sessionmaker=services.sessionmaker,
            storage=services.storage,
            jobs=services.jobs,
            actor=Actor(
                principal=NOT_YET_AUTHENTICATED,
                request_id=uuid.uuid4().hex,
                client_ip=client.host if client else None,
                user_agent=websocket.headers.get("user-agent"),
            ),
            events=services.events,
            view_urls=services.view_urls,
            websocket=websocket,
            oidc=services.oidc,
            query_cost=self.query_cost,
        )

    async def on_ws_connect(self, context: LiveContext) -> UnsetType:
        principal = await _authenticate(context)
        context.actor = dataclasses.replace(context.actor, principal=principal)
        # No payload: the acknowledgement is `{"type": "connection_ack"}` alone.
        return UnsetType()


async def _authenticate(context: LiveContext) -> Principal:
    settings = context.settings
    if settings.auth_disabled:
        return ANONYMOUS_ADMIN
    params = context.connection_params
    authorization = params.get("Authorization", params.get("authorization"))
    if not isinstance(authorization, str):
        authorization = context.websocket.headers.get("authorization")
    try:
        return await authenticate(
            context.sessionmaker, bearer_token(authorization), oidc=context.oidc, now=utcnow()
        )
    except AppError as error:
        raise ConnectionRejectionError({"message": error.message}) from error
    except Exception as error:
        logger.exception("WebSocket authentication failed (connection %s)", context.connection_id)
        raise ConnectionRejectionError() from error
