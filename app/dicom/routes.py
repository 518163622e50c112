"""GET /api/mask-group/{id}/seg.dcm: the group's DICOM SEG, built on demand and streamed."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from typing import IO, TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from app.dicom.errors import DicomMismatch, PacsNotConfigured, PacsUnavailable
from app.dicom.export import group_seg
from app.errors import AppError, BadUserInput, Conflict, NotFound
from app.routes import authentication_refusal
from app.state import services_of
from app.storage import StorageError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
# Written to a spooled file: small SEGs stay in memory, large ones go to disk, so the
# encoded SEG is never held twice while it is streamed.
SPOOL_MAX = 16 << 20
STATUS_BY_ERROR: dict[type[AppError], int] = {
    BadUserInput: 400,
    NotFound: 404,
    Conflict: 409,
    DicomMismatch: 422,
    PacsNotConfigured: 503,
    PacsUnavailable: 503,
}


def _write(seg: Dataset) -> IO[bytes]:
    # Closed by _chunks once streamed.
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX)  # noqa: SIM115
    seg.save_as(spool, enforce_file_format=True)
    spool.seek(0)
    return spool


async def _chunks(spool: IO[bytes]) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(spool.read, CHUNK):
            yield chunk
    finally:
        spool.close()


async def download_seg(request: Request) -> Response:
    if (refusal := await authentication_refusal(request)) is not None:
        return refusal
    services = services_of(request)
    group_id: int = request.path_params["group_id"]
    try:
        seg = await group_seg(services.sessionmaker, services.storage, services.settings, group_id)
    except AppError as error:
        status = next(
            (code for kind, code in STATUS_BY_ERROR.items() if isinstance(error, kind)), 500
        )
        if status == 500:
            raise
        return PlainTextResponse(error.message, status_code=status)
    except StorageError:
        logger.exception("seg.dcm: storage unavailable for group %s", group_id)
        return PlainTextResponse("storage unavailable", status_code=503)
    spool = await asyncio.to_thread(_write, seg)
    del seg
    size = spool.seek(0, 2)
    spool.seek(0)
    return StreamingResponse(
        _chunks(spool),
        media_type="application/dicom",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="mask-group-{group_id}-seg.dcm"',
            "Cache-Control": "private, no-store",
        },
    )


ROUTES = [Route("/api/mask-group/{group_id:int}/seg.dcm", download_seg, methods=["GET"])]
