"""One log line and one set of metrics per HTTP request: method, path (never its query string:
storage URLs carry signatures there), route, status, duration, request id, user, operation."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logging_setup import REQUEST_STATE
from app.metrics import UNMATCHED_ROUTE, observe_request

access_log = logging.getLogger("app.access")


class AccessMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        token = REQUEST_STATE.set(state)
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
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
