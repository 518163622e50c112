"""Validation of stored groups: each kind of damage is found and a good group passes, on the
embedded default and on PostgreSQL + S3. Damage is done behind the server's back, straight
in storage, with URLs signed by the storage backend itself."""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Any

import numpy as np
from conftest import Stack
from flows import create_annotation, create_group
from operations import COMPLETE, REQUEST_URLS
from PIL import Image
from test_upload_cli import env_for, pacs_masks

from app.group_validation import validate_group
from app.models import utcnow

VALIDATE = """mutation($id: ID!) { validateMaskGroup(id: $id) {
  status problemCount problems { sliceIndex code message } } }"""
LATEST = (
    """query($id: ID!) { maskGroup(id: $id) { validation { status checkedAt problemCount } } }"""
)


def png(mode: str = "L", size: tuple[int, int] = (8, 6)) -> bytes:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[1, 1] = 1
    image = Image.fromarray(array * 255).convert(mode)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def md5_b64(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


async def upload_bodies(
    stack: Stack, slice_count: int, bodies: dict[int, bytes], dims: dict[int, tuple[int, int]]
) -> tuple[str, dict[int, str]]:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, slice_count)
    slices = [
        {"sliceIndex": index, "fileSize": len(body), "contentMd5": md5_b64(body)}
        for index, body in bodies.items()
    ]
    targets = (await stack.data(REQUEST_URLS, {"groupId": group_id, "slices": slices}))[
        "requestMaskUploadUrls"
    ]
    for target in targets:
        headers = {header["name"]: header["value"] for header in target["headers"]}
        response = await stack.storage_client.put(
            target["url"], content=bodies[target["sliceIndex"]], headers=headers
        )
        assert response.status_code == 200, response.text
    completed = [
        {
            "sliceIndex": index,
            "width": dims.get(index, (8, 6))[0],
            "height": dims.get(index, (8, 6))[1],
        }
        for index in bodies
    ]
    await stack.data(COMPLETE, {"groupId": group_id, "slices": completed})
    return group_id, {target["sliceIndex"]: target["filePath"] for target in targets}


async def overwrite(stack: Stack, key: str, body: bytes) -> None:
    signed = stack.storage.presign_put(
        key,
        content_type="image/png",
        content_md5=md5_b64(body),
        content_length=len(body),
        expires_in=60,
        now=utcnow(),
    )
    response = await stack.storage_client.put(
        signed.url, content=body, headers=dict(signed.headers)
    )
    assert response.status_code == 200, response.text


async def test_good_group_is_valid_and_readers_see_it(stack: Stack) -> None:
    group_id, _ = await upload_bodies(stack, 3, {0: png("L"), 1: png("1"), 2: png("P")}, {})
    assert (await stack.data(LATEST, {"id": group_id}, as_="reader"))["maskGroup"][
        "validation"
    ] is None
    report = (await stack.data(VALIDATE, {"id": group_id}))["validateMaskGroup"]
    assert report == {"status": "VALID", "problemCount": 0, "problems": []}
    latest = (await stack.data(LATEST, {"id": group_id}, as_="reader"))["maskGroup"]["validation"]
    assert (latest["status"], latest["problemCount"]) == ("VALID", 0)

    for role in ("reader", "other"):
        refused = await stack.error(VALIDATE, {"id": group_id}, as_=role)
        assert refused["extensions"]["code"] == "FORBIDDEN"
    assert (await stack.data(VALIDATE, {"id": group_id}, as_="admin"))["validateMaskGroup"][
        "status"
    ] == "VALID"
    missing = await stack.error(VALIDATE, {"id": "999999"})
    assert missing["extensions"]["code"] == "NOT_FOUND"

    run = await pacs_masks("validate", group_id, "--json", env=env_for(stack))
    assert run.code == 0, run.stderr
    assert '"status": "VALID"' in run.stdout


async def test_every_kind_of_damage_is_reported(stack: Stack) -> None:
    good = png("L")
    bodies = {
        0: good,  # deleted behind the server's back
        1: good,  # overwritten with other bytes of the same size
        2: good,  # overwritten with a longer body
        3: b"hello, I am a text file declared as image/png",
        4: png("L", (16, 16)),  # not the group's dimensions
        5: png("RGB"),  # colour is not a mask
        6: good,  # recorded as 9 wide
        7: png("P"),
        8: png("1"),
    }
    group_id, keys = await upload_bodies(stack, 10, bodies, {4: (16, 16), 6: (9, 6)})
    await stack.storage.delete_prefix(keys[0])
    await overwrite(stack, keys[1], good[:-1] + bytes([good[-1] ^ 0xFF]))
    await overwrite(stack, keys[2], good + b"trailing")

    report = (await stack.data(VALIDATE, {"id": group_id}))["validateMaskGroup"]
    found = {(problem["sliceIndex"], problem["code"]) for problem in report["problems"]}
    assert found == {
        (0, "MISSING_OBJECT"),
        (1, "CHECKSUM_MISMATCH"),
        (2, "SIZE_MISMATCH"),
        (3, "NOT_A_PNG"),
        (4, "DIMENSION_MISMATCH"),
        (5, "BAD_PIXEL_MODE"),
        (6, "DIMENSION_MISMATCH"),
        (9, "MISSING_SLICE"),
    }
    assert (report["status"], report["problemCount"]) == ("INVALID", 8)
    assert [problem["sliceIndex"] for problem in report["problems"]] == [0, 1, 2, 3, 4, 5, 6, 9]

    run = await pacs_masks("validate", group_id, env=env_for(stack))
    assert run.code == 1, run.stderr
    assert run.stdout.startswith(f"group {group_id}: INVALID, 8 problem(s)")
    assert "slice 3: NOT_A_PNG" in run.stdout
    refused = await pacs_masks("validate", "999999", env=env_for(stack))
    assert (refused.code, refused.stderr) == (3, "pacs-masks: mask group 999999 does not exist\n")


async def test_runner_entry_point_stores_the_latest_report(stack: Stack) -> None:
    group_id, keys = await upload_bodies(stack, 2, {0: png(), 1: png()}, {})
    first = await validate_group(
        stack.sessionmaker, stack.storage, int(group_id), events=stack.services.events
    )
    assert first.status.value == "VALID"
    await stack.storage.delete_prefix(keys[1])
    second = await validate_group(
        stack.sessionmaker, stack.storage, int(group_id), events=stack.services.events
    )
    assert [(p.slice_index, p.code) for p in second.problems] == [(1, "MISSING_OBJECT")]
    latest: dict[str, Any] = (await stack.data(LATEST, {"id": group_id}))["maskGroup"]["validation"]
    assert (latest["status"], latest["problemCount"]) == ("INVALID", 1)
