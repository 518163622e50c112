"""Every refused input gets its code, names the offending slices, and writes nothing."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from conftest import Stack, content_md5, png_bytes
from flows import create_annotation, create_group, slice_inputs, upload
from operations import COMPLETE, CREATE_ANNOTATION, CREATE_GROUP, DELETE_GROUP, REQUEST_URLS
from sqlalchemy import select

from app.models import Annotation, Mask, MaskGroup, MaskUpload, StorageDeletion

TABLES = (Annotation, MaskGroup, Mask, MaskUpload, StorageDeletion)


async def snapshot(stack: Stack) -> list[list[tuple[Any, ...]]]:
    async with stack.sessionmaker() as session:
        return [
            [tuple(row) for row in (await session.execute(select(model.__table__))).all()]
            for model in TABLES
        ]


async def refused(stack: Stack, query: str, variables: dict[str, Any], code: str) -> dict[str, Any]:
    before = await snapshot(stack)
    error = await stack.error(query, variables)
    assert error["extensions"]["code"] == code, error
    assert await snapshot(stack) == before
    return error


@pytest.mark.parametrize(
    ("annotation", "fragment"),
    [
        ({"studyInstanceUid": "not-a-uid"}, "DICOM UID"),
        ({"studyInstanceUid": "1." + "2" * 70}, "DICOM UID"),
        ({"studyInstanceUid": "1.02.3"}, "DICOM UID"),
        ({"studyInstanceUid": "1.2.3", "seriesInstanceUid": "1.2.x"}, "seriesInstanceUid"),
        ({"studyInstanceUid": "1.2.3", "label": "x" * 300}, "label"),
        # NUL itself is refused before execution (tests/test_clean_errors.py).
        ({"studyInstanceUid": "1.2.3", "label": "bad\x01label"}, "control"),
    ],
)
async def test_create_annotation_refuses(
    stack: Stack, annotation: dict[str, Any], fragment: str
) -> None:
    error = await refused(stack, CREATE_ANNOTATION, {"input": annotation}, "BAD_USER_INPUT")
    assert fragment in error["message"]


async def test_missing_required_field_is_bad_user_input(stack: Stack) -> None:
    await refused(stack, CREATE_ANNOTATION, {"input": {}}, "BAD_USER_INPUT")


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"sliceCount": 0}, "BAD_USER_INPUT"),
        ({"sliceCount": 100_001}, "BAD_USER_INPUT"),
        ({"maskType": " "}, "BAD_USER_INPUT"),
        ({"description": "d" * 4001}, "BAD_USER_INPUT"),
        ({"modality": "M" * 17}, "BAD_USER_INPUT"),
        ({"confidence": 1.5}, "BAD_USER_INPUT"),
    ],
)
async def test_create_mask_group_refuses(stack: Stack, extra: dict[str, Any], code: str) -> None:
    annotation_id = await create_annotation(stack)
    await refused(stack, CREATE_GROUP, {"input": {"annotationId": annotation_id, **extra}}, code)


async def test_create_mask_group_needs_an_annotation(stack: Stack) -> None:
    await refused(stack, CREATE_GROUP, {"input": {"annotationId": "999999"}}, "NOT_FOUND")
    await refused(stack, CREATE_GROUP, {"input": {"annotationId": "abc"}}, "BAD_USER_INPUT")


def _slice(index: int, **changes: Any) -> dict[str, Any]:
    body = png_bytes(index)
    return {"sliceIndex": index, "fileSize": len(body), "contentMd5": content_md5(body), **changes}


@pytest.mark.parametrize(
    ("bad", "offending"),
    [
        (_slice(-1), -1),
        (_slice(4), 4),
        (_slice(2, labelName="../etc"), 2),
        (_slice(2, labelName="a b"), 2),
        (_slice(2, labelName="x" * 65), 2),
        (_slice(2, labelName="_lead"), 2),
        (_slice(2, contentType="image/gif"), 2),
        (_slice(2, contentType="text/html"), 2),
        (_slice(2, fileSize=0), 2),
        (_slice(2, fileSize=64 * 1024 * 1024 + 1), 2),
        (_slice(2, contentMd5="not base64!"), 2),
        (_slice(2, contentMd5=base64.b64encode(b"x" * 15).decode()), 2),
        (_slice(2, contentMd5="0" * 32), 2),
        (_slice(0), 0),  # the same slice twice in one call
    ],
)
async def test_request_urls_refuses_slice_and_writes_nothing(
    stack: Stack, bad: dict[str, Any], offending: int
) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 4)
    slices = [_slice(0), _slice(1), bad]
    error = await refused(
        stack, REQUEST_URLS, {"groupId": group_id, "slices": slices}, "BAD_USER_INPUT"
    )
    assert error["extensions"]["sliceIndexes"] == [offending]
    assert error["extensions"]["problems"][0]["sliceIndex"] == offending


async def test_request_urls_lists_every_offending_slice(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 10)
    slices = [_slice(0), _slice(3, fileSize=0), _slice(11), _slice(5, labelName="b@d")]
    error = await refused(
        stack, REQUEST_URLS, {"groupId": group_id, "slices": slices}, "BAD_USER_INPUT"
    )
    assert error["extensions"]["sliceIndexes"] == [3, 5, 11]


@pytest.mark.parametrize("ttl", [0, -5, 3601])
async def test_request_urls_refuses_ttl(stack: Stack, ttl: int) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    await refused(
        stack,
        REQUEST_URLS,
        {"groupId": group_id, "slices": [_slice(0)], "ttl": ttl},
        "BAD_USER_INPUT",
    )


async def test_request_urls_refuses_empty_and_oversized_batches(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 6000)
    await refused(stack, REQUEST_URLS, {"groupId": group_id, "slices": []}, "BAD_USER_INPUT")
    too_many = [_slice(index) for index in range(stack.settings.max_slices_per_call + 1)]
    # Refused before coercion (HTTP 400); tests/test_input_limits.py checks the details.
    body = {"query": REQUEST_URLS, "variables": {"groupId": group_id, "slices": too_many}}
    response = await stack.client.post("/graphql", json=body)
    assert response.status_code == 400
    assert response.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_request_urls_unknown_group(stack: Stack) -> None:
    await refused(stack, REQUEST_URLS, {"groupId": "424242", "slices": [_slice(0)]}, "NOT_FOUND")


async def test_request_urls_for_registered_slice_conflicts(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 3)
    await upload(stack, group_id, [0, 1])
    error = await refused(
        stack,
        REQUEST_URLS,
        {"groupId": group_id, "slices": [_slice(1), _slice(2)]},
        "CONFLICT",
    )
    assert error["extensions"]["sliceIndexes"] == [1]


async def test_request_urls_in_one_call_for_2000_slices(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2000)
    slices, _ = slice_inputs(range(2000))
    targets = (await stack.data(REQUEST_URLS, {"groupId": group_id, "slices": slices}))[
        "requestMaskUploadUrls"
    ]
    assert len(targets) == 2000
    assert len({target["url"] for target in targets}) == 2000
    async with stack.sessionmaker() as session:
        count = len((await session.execute(select(MaskUpload.id))).all())
    assert count == 2000


async def test_reissued_url_replaces_the_declaration(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 1)
    await stack.data(REQUEST_URLS, {"groupId": group_id, "slices": [_slice(0, fileSize=10)]})
    result = await upload(stack, group_id, [0])
    assert result["masks"][0]["fileSize"] == len(png_bytes(0))


async def test_complete_refuses_bad_slices(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 3)
    await upload(stack, group_id, [0, 1], complete=False)
    for slices, offending in [
        ([{"sliceIndex": 0}, {"sliceIndex": 3}], [3]),
        ([{"sliceIndex": 0}, {"sliceIndex": 0}], [0]),
        ([{"sliceIndex": 1, "sopInstanceUid": "x.y"}], [1]),
        ([{"sliceIndex": 1, "width": 0}], [1]),
        ([{"sliceIndex": 1, "labelName": "no/slash"}], [1]),
    ]:
        error = await refused(
            stack, COMPLETE, {"groupId": group_id, "slices": slices}, "BAD_USER_INPUT"
        )
        assert error["extensions"]["sliceIndexes"] == offending
    await refused(stack, COMPLETE, {"groupId": group_id, "slices": []}, "BAD_USER_INPUT")
    await refused(
        stack, COMPLETE, {"groupId": "999999", "slices": [{"sliceIndex": 0}]}, "NOT_FOUND"
    )


async def test_delete_unknown_group(stack: Stack) -> None:
    await refused(stack, DELETE_GROUP, {"id": "777777"}, "NOT_FOUND")
    await refused(stack, DELETE_GROUP, {"id": "-1"}, "BAD_USER_INPUT")
