"""A loopback HTTP proxy in front of a real server that misbehaves on purpose: it answers 503
to every Nth PUT and to every Nth URL-signing request, and holds chosen PUTs back long enough
for their signed URLs to expire on the way. A real network hop, not a patch of our code."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class FaultPlan:
    upstream: str = ""
    fail_every_nth_put: int = 0
    fail_every_nth_signing: int = 0
    # The first PUT of each of these slice file names waits this long before going on.
    delay_first_put_of: set[str] = field(default_factory=set)
    delay_seconds: float = 0.0
    # Every PUT waits this long: a slow storage link.
    put_latency: float = 0.0
    puts: int = 0
    signings: int = 0
    failed_puts: int = 0
    failed_signings: int = 0
    delayed: set[str] = field(default_factory=set)


def _app(plan: FaultPlan, client: httpx.AsyncClient) -> Starlette:
    async def forward(request: Request) -> Response:
        body = await request.body()
        if request.method == "PUT":
            plan.puts += 1
            if plan.fail_every_nth_put and plan.puts % plan.fail_every_nth_put == 0:
                plan.failed_puts += 1
                return Response("<Error><Code>SlowDown</Code></Error>", status_code=503)
            await asyncio.sleep(plan.put_latency)
            name = request.url.path.rsplit("/", 1)[-1]
            if name in plan.delay_first_put_of and name not in plan.delayed:
                plan.delayed.add(name)
                await asyncio.sleep(plan.delay_seconds)
        elif request.method == "POST" and b"requestMaskUploadUrls" in body:
            plan.signings += 1
            if plan.fail_every_nth_signing and plan.signings % plan.fail_every_nth_signing == 0:
                plan.failed_signings += 1
                return Response("busy", status_code=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        url = (
            plan.upstream
            + request.url.path
            + (f"?{request.url.query}" if request.url.query else "")
        )
        answer = await client.request(request.method, url, content=body, headers=headers)
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
        kept.pop("content-encoding", None)
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    methods = ["GET", "PUT", "POST", "HEAD", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


@contextlib.asynccontextmanager
async def fault_proxy(plan: FaultPlan) -> AsyncIterator[str]:
    """Yields the proxy's base URL; set `plan.upstream` before traffic flows."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    async with httpx.AsyncClient(timeout=60) as client:
        config = uvicorn.Config(
            _app(plan, client), log_config=None, access_log=False, timeout_keep_alive=30
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task
            sock.close()
