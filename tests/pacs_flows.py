"""A served stack wired to the test PACS, real PNG masks for a CT series, and their upload
through the API (a pytest plugin: its fixtures serve tests/test_pacs.py and test_dicom_seg.py).

The stack reaches Orthanc through a TCP relay the tests can stop and start again: an
unreachable PACS that comes back, without touching the app's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from conftest import Stack, base_settings, content_md5, open_stack
from flows import put
from operations import COMPLETE, CREATE_ANNOTATION, CREATE_GROUP, REQUEST_URLS
from pacs_server import CtSeries, OrthancServer
from PIL import Image

MASK_QUERY = """
query($id: ID!) {
  maskGroup(id: $id) {
    id status sliceCount
    dicomExport {
      status seriesInstanceUid sopInstanceUid segmentCount frameCount requestedAt finishedAt
      error
    }
  }
}"""

EXPORT = """
mutation($id: ID!) {
  exportMaskGroupToPacs(id: $id) { status seriesInstanceUid sopInstanceUid error requestedAt }
}"""


class TcpRelay:
    """Forwards a loopback port to Orthanc while started; refuses connections while stopped."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(upstream_writer)
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )
        self._writers.discard(writer)
        self._writers.discard(upstream_writer)


@pytest.fixture(scope="session")
async def pacs_relay(orthanc: OrthancServer) -> AsyncIterator[TcpRelay]:
    relay = TcpRelay(int(orthanc.base_url.rsplit(":", 1)[1]))
    await relay.start()
    yield relay
    with contextlib.suppress(AssertionError):
        await relay.stop()


@pytest.fixture(scope="session")
async def pacs_stack(
    postgres_url: str,
    orthanc: OrthancServer,
    pacs_relay: TcpRelay,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """PostgreSQL (the export claim uses FOR UPDATE SKIP LOCKED), local storage, the PACS."""
    settings = base_settings(
        database_url=postgres_url,
        var_dir=tmp_path_factory.mktemp("pacs-var"),
        storage_provider="local",
        dicomweb_url=f"http://127.0.0.1:{pacs_relay.port}/dicom-web",
        dicomweb_username=orthanc.username,
        dicomweb_password=orthanc.password,
        dicomweb_timeout=20,
        dicom_export_enabled=True,
    )
    async with open_stack("postgresql-local-orthanc", settings) as stack:
        yield stack


@pytest.fixture
async def pstack(pacs_stack: Stack) -> AsyncIterator[Stack]:
    from conftest import reset

    try:
        yield pacs_stack
    finally:
        await reset(pacs_stack)


# --- masks -----------------------------------------------------------------------------------


def synthetic_masks(
    slices: int, size: int, labels: list[str | None], *, overlap: bool = False
) -> dict[tuple[int, str | None], np.ndarray[Any, Any]]:
    """A boolean mask per (source position, label): shapes that move from slice to slice,
    some slices empty for a label; labels overlap only when asked."""
    masks: dict[tuple[int, str | None], np.ndarray[Any, Any]] = {}
    for number, label in enumerate(labels):
        for position in range(slices):
            plane = np.zeros((size, size), np.bool_)
            if (position + number) % 6 != 0:
                top = 4 + (position * 3 + number * 7) % (size // 3)
                left = 2 + number * (size // 2) if not overlap else 10
                plane[top : top + size // 4, left : left + size // 3 + position % 5] = True
            masks[(position, label)] = plane
    return masks


def png(plane: np.ndarray[Any, Any]) -> bytes:
    """8-bit 0/255, as most viewers and models write them."""
    buffer = io.BytesIO()
    Image.fromarray(plane.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def decode(body: bytes) -> np.ndarray[Any, Any]:
    with Image.open(io.BytesIO(body)) as image:
        return np.asarray(image) != 0


async def create_annotation(stack: Stack, series: CtSeries) -> str:
    data = await stack.data(
        CREATE_ANNOTATION,
        {
            "input": {
                "studyInstanceUid": series.study_instance_uid,
                "seriesInstanceUid": series.series_instance_uid,
                "label": "synthetic CT",
            }
        },
    )
    annotation_id: str = data["createAnnotation"]["id"]
    return annotation_id


async def upload_group(
    stack: Stack,
    annotation_id: str,
    slice_count: int,
    masks: dict[tuple[int, str | None], np.ndarray[Any, Any]],
    *,
    slice_of: dict[int, int] | None = None,
    sop_of: dict[int, str] | None = None,
    seed: int = 1,
    expect_status: str = "COMPLETE",
    **group: Any,
) -> str:
    """Uploads the masks through the API in shuffled order; `slice_of` maps a source position
    to the sliceIndex used (identity by default), `sop_of` a position to its sopInstanceUid."""
    data = await stack.data(
        CREATE_GROUP,
        {"input": {"annotationId": annotation_id, "sliceCount": slice_count, **group}},
    )
    group_id: str = data["createMaskGroup"]["id"]
    items = list(masks.items())
    random.Random(seed).shuffle(items)
    bodies = {}
    slices = []
    for (position, label), plane in items:
        index = (slice_of or {}).get(position, position)
        body = png(plane)
        bodies[(index, label)] = body
        slices.append(
            {
                "sliceIndex": index,
                "labelName": label,
                "fileSize": len(body),
                "contentMd5": content_md5(body),
            }
        )
    targets = (await stack.data(REQUEST_URLS, {"groupId": group_id, "slices": slices}))[
        "requestMaskUploadUrls"
    ]
    statuses = await asyncio.gather(
        *(
            put(stack, target, bodies[(target["sliceIndex"], target["labelName"])])
            for target in targets
        )
    )
    assert set(statuses) == {200}
    position_of = {index: position for position, index in (slice_of or {}).items()}
    completed = [
        {
            "sliceIndex": item["sliceIndex"],
            "labelName": item["labelName"],
            "width": plane_size(masks),
            "height": plane_size(masks),
            "sopInstanceUid": (sop_of or {}).get(
                position_of.get(item["sliceIndex"], item["sliceIndex"])
            ),
        }
        for item in slices
    ]
    result = await stack.data(COMPLETE, {"groupId": group_id, "slices": completed})
    assert result["completeMaskUpload"]["maskGroup"]["status"] == expect_status
    return group_id


def plane_size(masks: dict[tuple[int, str | None], np.ndarray[Any, Any]]) -> int:
    return int(next(iter(masks.values())).shape[0])


async def wait_for_export(stack: Stack, group_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        data = await stack.data(MASK_QUERY, {"id": group_id}, as_="reader")
        export: dict[str, Any] = data["maskGroup"]["dicomExport"]
        if export["status"] in ("DONE", "FAILED"):
            return export
        assert asyncio.get_running_loop().time() < deadline, export
        await asyncio.sleep(0.1)


async def export(stack: Stack, group_id: str, *, as_: str = "uploader") -> dict[str, Any]:
    started = await stack.data(EXPORT, {"id": group_id}, as_=as_)
    assert started["exportMaskGroupToPacs"]["status"] in ("PENDING", "RUNNING")
    return await wait_for_export(stack, group_id)
