"""The HTTP routes beside /graphql: health, readiness, the image view, local-disk objects."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from app.auth import CHALLENGE, AuthenticationUnavailable, authenticate_request
from app.errors import Unauthenticated
from app.local_storage import LocalStorage
from app.metrics import DATABASE_ERRORS, STORAGE_ERRORS
from app.models import MAX_ID
from app.readiness import readiness
from app.slices import find_mask
from app.state import services_of
from app.storage import LABEL_PATTERN, StorageError

logger = logging.getLogger(__name__)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    """Each dependency named: {"database": "ok", "migrations": "ok", "storage": "ok"}."""
    services = services_of(request)
    timeout = services.settings.readiness_timeout
    states, problems = await readiness(services.engine, services.storage, timeout)
    if states["database"] != "ok":
        DATABASE_ERRORS.labels("readyz").inc()
    if problems:
        logger.warning("readiness: %s", "; ".join(problems))
    ready = all(state == "ok" for state in states.values())
    return JSONResponse(states, status_code=200 if ready else 503)


async def authentication_refusal(request: Request) -> Response | None:
    """The answer for a caller who cannot be authenticated (401, or 500 with the request id
    when authentication itself failed); None for one who can."""
    try:
        await authenticate_request(request)
    except Unauthenticated as error:
        return PlainTextResponse(error.message, status_code=401, headers=CHALLENGE)
    except AuthenticationUnavailable as error:
        return PlainTextResponse(error.message, status_code=500)
    return None


async def view_mask(request: Request) -> Response:
    """Streams one stored mask image through the server (same-origin for the viewer)."""
    services = services_of(request)
    group_id: int = request.path_params["group_id"]
    seconds_left = None
    if "signature" in request.query_params:
        # A signed viewUrl (app/view_urls.py) stands for the bearer token for this one image.
        seconds_left = services.view_urls.seconds_left(group_id, request.query_params)
        if seconds_left is None:
            return PlainTextResponse("invalid or expired view URL", status_code=403)
    elif (refusal := await authentication_refusal(request)) is not None:
        return refusal
    slice_param = request.query_params.get("slice", "")
    label = request.query_params.get("label") or None
    # isdigit() alone admits "²", which int() refuses.
    if not (slice_param.isascii() and slice_param.isdigit()):
        return PlainTextResponse("slice must be a non-negative integer", status_code=400)
    if label is not None and not LABEL_PATTERN.match(label):
        return PlainTextResponse("label must match [A-Za-z0-9][A-Za-z0-9_-]{0,63}", status_code=400)
    if group_id > MAX_ID or len(slice_param.lstrip("0")) > 10 or int(slice_param) > MAX_ID:
        return PlainTextResponse("no such mask", status_code=404)  # beyond any stored id
    async with services.sessionmaker() as session:
        row = await find_mask(session, group_id, int(slice_param), label)
    if row is None:
        return PlainTextResponse("no such mask", status_code=404)
    etag = f'"{row.checksum.removeprefix("md5:")}"'
    # A signed URL names one image until it expires: the browser may reuse it until then.
    cache = f"private, max-age={seconds_left}" if seconds_left else "private, no-cache"
    headers = {"ETag": etag, "Cache-Control": cache}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    try:
        stream = await services.storage.open(row.file_path)
    except StorageError:
        logger.exception("view: storage unavailable for %s", row.file_path)
        STORAGE_ERRORS.labels("view").inc()
        return PlainTextResponse("storage unavailable", status_code=503)
    if stream is None:
        return PlainTextResponse("object missing from storage", status_code=404)
    headers["Content-Length"] = str(stream.size)
    return StreamingResponse(stream.chunks, media_type=row.mime_type, headers=headers)


async def local_object(request: Request) -> Response:
    """Signed uploads and downloads of the local-disk backend (mounted only with it)."""
    storage = services_of(request).storage
    if not isinstance(storage, LocalStorage):
        return PlainTextResponse("not found", status_code=404)
    return await storage.handle(request)
