"""What every HTTP request gets on its way through: an id (the caller's X-Request-ID if sane)
for logs and errors, the server's time in Server-Timing so clients can tell it from the
network (`app`, and beside it what the request waited on, such as `storage`), and one log
line and one set of metrics: method, path (never its query string: storage URLs carry
signatures there), route, status, duration, request id, user, operation."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logging_setup import REQUEST_STATE
from app.metrics import UNMATCHED_ROUTE, observe_request

access_log = logging.getLogger("app.access")

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class AccessMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = REQUEST_STATE.set(state)
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed_ms = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                timing = f"app;dur={elapsed_ms:.1f}" + "".join(
                    f", {metric};dur={seconds * 1000:.1f}"
                    for metric, seconds in state.get("server_timing", {}).items()
                )
                headers.append((b"server-timing", timing.encode("latin-1")))
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope["method"]
            observe_request(
                template,
                method,
                status,
                seconds,
                state.get("operation"),
                state.get("graphql_errors", ()),
            )
            access_log.info(
                "%s %s %s %.1f ms",
                method,
                scope["path"],
                status,
                seconds * 1000,
                extra={
                    "method": method,
                    "path": scope["path"],
                    "route": template,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                    "error_codes": sorted({code for _, code in state.get("graphql_errors", ())}),
                },
            )
            REQUEST_STATE.reset(token)
