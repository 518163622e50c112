"""completeMaskUpload verifies storage: missing, altered and wrong-body objects are refused."""

from __future__ import annotations

import re

from conftest import Stack, content_md5, png_bytes
from flows import create_annotation, create_group, put, upload
from operations import COMPLETE, REQUEST_URLS, TREE
from sqlalchemy import func, select

from app.models import Mask, utcnow

TIMING = re.compile(r"([a-z]+);dur=([0-9.]+)")


async def _mask_count(stack: Stack) -> int:
    async with stack.sessionmaker() as session:
        return (await session.scalar(select(func.count()).select_from(Mask))) or 0


async def test_completion_is_idempotent(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    first = await upload(stack, group_id, [0, 1])
    again = (
        await stack.data(
            COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}, {"sliceIndex": 1}]}
        )
    )["completeMaskUpload"]
    assert [mask["id"] for mask in again["masks"]] == [mask["id"] for mask in first["masks"]]
    assert again["maskGroup"] == first["maskGroup"]
    assert await _mask_count(stack) == 2


async def test_completion_reports_its_storage_listing_in_server_timing(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    await upload(stack, group_id, [0, 1], complete=False)
    variables = {"groupId": group_id, "slices": [{"sliceIndex": 0}, {"sliceIndex": 1}]}
    response = await stack.client.post("/graphql", json={"query": COMPLETE, "variables": variables})
    assert "errors" not in response.json()
    timings = dict(TIMING.findall(response.headers["server-timing"]))
    # (`gc` too when a collection happened meanwhile.)
    assert {"app", "storage"} <= set(timings) <= {"app", "storage", "gc"}
    # The listing is part of the request: `app` minus `storage` is the server's own work.
    assert 0 <= float(timings["storage"]) <= float(timings["app"])
    # Requests that wait on nothing report their own time alone.
    other = await stack.client.post("/graphql", json={"query": "{ __typename }"})
    assert "storage" not in dict(TIMING.findall(other.headers["server-timing"]))


async def test_completion_without_upload_is_incomplete_and_registers_nothing(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 4)
    staged = await upload(stack, group_id, [0, 1, 2], complete=False)
    # Slice 3 never got a URL; slice 2's object is removed behind our back.
    await stack.storage.delete_prefix(staged["targets"][2]["filePath"])
    error = await stack.error(
        COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": i} for i in range(4)]}
    )
    assert error["extensions"]["code"] == "UPLOAD_INCOMPLETE"
    assert error["extensions"]["sliceIndexes"] == [2, 3]
    assert await _mask_count(stack) == 0
    # The slices that were fine still complete afterwards.
    ok = await stack.data(
        COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}, {"sliceIndex": 1}]}
    )
    assert ok["completeMaskUpload"]["maskGroup"]["status"] == "UPLOADING"


async def test_completion_of_an_altered_object_is_a_checksum_mismatch(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    staged = await upload(stack, group_id, [0, 1], complete=False)
    # Someone with their own signed URL overwrites slice 1 with other bytes.
    other = png_bytes(1234, 200)
    key = staged["targets"][1]["filePath"]
    signed = stack.storage.presign_put(
        key,
        content_type="image/png",
        content_md5=content_md5(other),
        content_length=len(other),
        expires_in=60,
        now=utcnow(),
    )
    response = await stack.storage_client.put(
        signed.url, content=other, headers=dict(signed.headers)
    )
    assert response.status_code == 200
    error = await stack.error(
        COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}, {"sliceIndex": 1}]}
    )
    assert error["extensions"]["code"] == "CHECKSUM_MISMATCH"
    assert error["extensions"]["sliceIndexes"] == [1]
    assert await _mask_count(stack) == 0


async def test_a_body_other_than_declared_never_registers(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 1)
    declared = png_bytes(1)
    targets = (
        await stack.data(
            REQUEST_URLS,
            {
                "groupId": group_id,
                "slices": [
                    {
                        "sliceIndex": 0,
                        "fileSize": len(declared),
                        "contentMd5": content_md5(declared),
                    }
                ],
            },
        )
    )["requestMaskUploadUrls"]
    wrong = bytes(reversed(declared))
    status = await put(stack, targets[0], wrong)
    error = await stack.error(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}]})
    # Storage refuses the PUT itself (our local backend and SeaweedFS check Content-MD5);
    # completion would catch it anyway on a server that does not (moto).
    assert status == 400
    assert error["extensions"]["code"] == "UPLOAD_INCOMPLETE"
    assert await _mask_count(stack) == 0


async def test_registered_slice_altered_later_is_reported(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 1)
    done = await upload(stack, group_id, [0])
    await stack.storage.delete_prefix(done["masks"][0]["filePath"])
    error = await stack.error(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}]})
    assert error["extensions"]["code"] == "UPLOAD_INCOMPLETE"
    assert await _mask_count(stack) == 1


async def test_large_volume_of_1500_slices(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 1500)
    result = await upload(stack, group_id, range(1500))
    assert result["maskGroup"]["status"] == "COMPLETE"
    assert len(result["masks"]) == 1500
    tree = (await stack.data(TREE, {"id": annotation_id}))["annotation"]
    assert len(tree["maskGroups"][0]["masks"]) == 1500
