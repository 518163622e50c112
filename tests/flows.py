"""The upload sequence as a client performs it, for tests that need registered masks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from conftest import Stack, content_md5, png_bytes
from operations import COMPLETE, CREATE_ANNOTATION, CREATE_GROUP, REQUEST_URLS


async def create_annotation(stack: Stack, study: str = "1.2.840.113619.2.55.3") -> str:
    data = await stack.data(
        CREATE_ANNOTATION,
        {"input": {"studyInstanceUid": study, "seriesInstanceUid": f"{study}.1", "label": "liver"}},
    )
    annotation_id: str = data["createAnnotation"]["id"]
    return annotation_id


async def create_group(stack: Stack, annotation_id: str, slice_count: int, **extra: Any) -> str:
    data = await stack.data(
        CREATE_GROUP,
        {"input": {"annotationId": annotation_id, "sliceCount": slice_count, **extra}},
    )
    group_id: str = data["createMaskGroup"]["id"]
    return group_id


def slice_inputs(
    indexes: range | list[int],
    label: str | None = None,
    make_body: Callable[[int], bytes] = png_bytes,
) -> tuple[list[dict[str, Any]], dict[int, bytes]]:
    bodies = {index: make_body(index) for index in indexes}
    slices = [
        {
            "sliceIndex": index,
            "labelName": label,
            "fileSize": len(body),
            "contentMd5": content_md5(body),
        }
        for index, body in bodies.items()
    ]
    return slices, bodies


async def put(stack: Stack, target: dict[str, Any], body: bytes) -> int:
    headers = {header["name"]: header["value"] for header in target["headers"]}
    response = await stack.storage_client.request(
        target["method"], target["url"], content=body, headers=headers
    )
    return response.status_code


async def upload(
    stack: Stack,
    group_id: str,
    indexes: range | list[int],
    label: str | None = None,
    *,
    complete: bool = True,
    make_body: Callable[[int], bytes] = png_bytes,
) -> dict[str, Any]:
    slices, bodies = slice_inputs(indexes, label, make_body)
    targets = (await stack.data(REQUEST_URLS, {"groupId": group_id, "slices": slices}))[
        "requestMaskUploadUrls"
    ]
    # Parallel PUTs, as the viewer and the inference worker do.
    gate = asyncio.Semaphore(32)

    async def put_one(target: dict[str, Any]) -> int:
        async with gate:
            return await put(stack, target, bodies[target["sliceIndex"]])

    statuses = await asyncio.gather(*(put_one(target) for target in targets))
    assert set(statuses) == {200}
    if not complete:
        return {"targets": targets, "bodies": bodies}
    completed = [
        {"sliceIndex": index, "labelName": label, "width": 512, "height": 512} for index in bodies
    ]
    data = await stack.data(COMPLETE, {"groupId": group_id, "slices": completed})
    result: dict[str, Any] = data["completeMaskUpload"]
    return result
