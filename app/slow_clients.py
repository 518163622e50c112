"""Slow clients: a connection may not hold a worker's attention longer than the settings allow.

uvicorn bounds idle keep-alive connections but not a request whose headers or body trickle in,
so both are bounded here: the headers by the HTTP protocol `serve` runs (`header_deadline_protocol`),
the body by an ASGI middleware (`BodyDeadlineMiddleware`) that answers 408 when the body is not
in by its deadline. A reverse proxy in front should bound them too (docs/security.md)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import httptools
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Request line and headers together; Starlette and the app never need more.
MAX_HEADER_BYTES = 64 * 1024
_TIMEOUT_BODY = b"request headers not received in time"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class BodyDeadlineMiddleware:
    """The whole request body must arrive within `timeout` seconds of the request's start;
    otherwise the request ends with 408 and the connection is closed."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        body_done = False

        async def receive_by_deadline() -> Message:
            nonlocal body_done
            if body_done:
                # After the body, receive() waits for the disconnect a streamed answer
                # listens for: that wait is not the client's to bound.
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"request body not received within {self.timeout:g} s",
                    headers={"Connection": "close"},
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_by_deadline, send)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline from a connection's (or a request's) first
    byte to the end of its headers, and a cap on their size."""

    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        self.header_timeout = header_timeout
        super().__init__(*args, **kwargs)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request waits behind a running answer: judge it after that.
            self._arm()
            return
        self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._header_bytes = 0
        self._arm()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            # uvicorn answers a parser error with 400 and closes the connection.
            raise httptools.HttpParserError(f"request headers exceed {MAX_HEADER_BYTES} bytes")

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()


def header_deadline_protocol(timeout: float) -> Callable[..., HttpToolsProtocol]:
    """The HTTP protocol for uvicorn (its `http` option). A partial of a module-level class,
    not a class made on the fly: `serve --workers` pickles it to each worker process."""
    return functools.partial(HeaderDeadlineProtocol, header_timeout=timeout)
