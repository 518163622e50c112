"""The whole upload sequence over HTTP, on SQLite + local disk and PostgreSQL + SeaweedFS S3."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from conftest import Stack, content_md5, open_stack, png_bytes, reset
from flows import create_annotation, create_group, put, slice_inputs
from operations import COMPLETE, DELETE_GROUP, REQUEST_URLS, TREE
from storage_servers import RcloneServer, s3_settings


async def test_create_upload_complete_query_delete(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 3, modelName="liver-seg", version="2.1")

    slices, bodies = slice_inputs(range(3))
    slices.append(
        {
            "sliceIndex": 1,
            "labelName": "tumor",
            "fileSize": 70,
            "contentMd5": content_md5(png_bytes(99, 64)[:70]),
        }
    )
    bodies_by_name = {(index, None): body for index, body in bodies.items()}
    bodies_by_name[(1, "tumor")] = png_bytes(99, 64)[:70]
    targets = (await stack.data(REQUEST_URLS, {"groupId": group_id, "slices": slices}))[
        "requestMaskUploadUrls"
    ]
    assert [target["filePath"] for target in targets] == [
        f"mask/{annotation_id}/{group_id}/slice_00000.png",
        f"mask/{annotation_id}/{group_id}/slice_00001.png",
        f"mask/{annotation_id}/{group_id}/slice_00002.png",
        f"mask/{annotation_id}/{group_id}/slice_00001_tumor.png",
    ]
    for target in targets:
        assert target["method"] == "PUT"
        headers = {header["name"]: header["value"] for header in target["headers"]}
        assert headers["Content-Type"] == "image/png"
        body = bodies_by_name[(target["sliceIndex"], target["labelName"])]
        assert headers["Content-MD5"] == content_md5(body)

    # Uploads go straight to storage, in parallel, as the viewer does.
    statuses = await asyncio.gather(
        *(
            put(stack, target, bodies_by_name[(target["sliceIndex"], target["labelName"])])
            for target in targets
        )
    )
    assert statuses == [200, 200, 200, 200]

    first = await stack.data(
        COMPLETE,
        {
            "groupId": group_id,
            "slices": [{"sliceIndex": 0, "width": 512, "height": 512, "sopInstanceUid": "1.2.3.4"}],
        },
    )
    assert first["completeMaskUpload"]["maskGroup"]["status"] == "UPLOADING"
    assert first["completeMaskUpload"]["maskGroup"]["missingSliceIndexes"] == [1, 2]

    rest = [{"sliceIndex": 1}, {"sliceIndex": 2}, {"sliceIndex": 1, "labelName": "tumor"}]
    done = (await stack.data(COMPLETE, {"groupId": group_id, "slices": rest}))["completeMaskUpload"]
    assert done["maskGroup"]["status"] == "COMPLETE"
    assert done["maskGroup"]["uploadedSliceCount"] == 3
    assert done["maskGroup"]["missingSliceIndexes"] == []
    total = sum(len(body) for body in bodies_by_name.values())
    assert done["maskGroup"]["totalBytes"] == total
    tumor = done["masks"][2]
    assert tumor["labelName"] == "tumor"
    assert (
        tumor["checksum"]
        == "md5:" + __import__("hashlib").md5(bodies_by_name[(1, "tumor")]).hexdigest()
    )
    assert tumor["viewUrl"].startswith(f"/api/mask-group/{group_id}/view?slice=1&label=tumor&")

    tree = (await stack.data(TREE, {"id": annotation_id}))["annotation"]
    [group] = tree["maskGroups"]
    assert group["status"] == "COMPLETE"
    assert [(mask["sliceIndex"], mask["labelName"]) for mask in group["masks"]] == [
        (0, None),
        (1, None),
        (1, "tumor"),
        (2, None),
    ]

    # The stored image comes back through the view endpoint and through a presigned GET.
    view = await stack.client.get(
        f"/api/mask-group/{group_id}/view", params={"slice": 1, "label": "tumor"}
    )
    assert view.status_code == 200
    assert view.content == bodies_by_name[(1, "tumor")]
    assert view.headers["content-type"] == "image/png"
    assert view.headers["etag"] == f'"{tumor["checksum"][4:]}"'
    assert view.headers["cache-control"].startswith("private")
    missing = await stack.client.get(f"/api/mask-group/{group_id}/view", params={"slice": 7})
    assert missing.status_code == 404

    download = await stack.data(
        "query($id: ID!) { mask(id: $id) { downloadUrl(ttlSeconds: 60) { url method headers { name } expiresAt } } }",
        {"id": tumor["id"]},
    )
    signed = download["mask"]["downloadUrl"]
    assert signed["method"] == "GET"
    async with httpx.AsyncClient() as plain:
        fetched = await plain.get(signed["url"])
    assert fetched.status_code == 200
    assert fetched.content == bodies_by_name[(1, "tumor")]

    deleted = (await stack.data(DELETE_GROUP, {"id": group_id}))["deleteMaskGroup"]
    assert deleted == {
        "id": group_id,
        "deletedMaskCount": 4,
        "deletedObjectCount": 4,
        # The PUT URLs issued for the group are still valid: the sweeper looks again later.
        "storageCleanupPending": True,
    }
    assert await stack.storage.stat_objects([target["filePath"] for target in targets]) == {}
    assert (await stack.data("query($id: ID!) { maskGroup(id: $id) { id } }", {"id": group_id}))[
        "maskGroup"
    ] is None
    gone = await stack.client.get(f"/api/mask-group/{group_id}/view", params={"slice": 1})
    assert gone.status_code == 404


async def refuses_what_it_must(stack: Stack) -> None:
    """Expired, tampered and wrong-body PUTs fail at storage; completion then finds nothing;
    the right body completes and deletion empties the prefix."""
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 1)
    slices, bodies = slice_inputs([0])

    short = await stack.data(REQUEST_URLS, {"groupId": group_id, "slices": slices, "ttl": 1})
    [expiring] = short["requestMaskUploadUrls"]
    await asyncio.sleep(2.1)
    assert await put(stack, expiring, bodies[0]) in (400, 403)

    fresh = await stack.data(REQUEST_URLS, {"groupId": group_id, "slices": slices})
    [target] = fresh["requestMaskUploadUrls"]
    tampered = dict(target, url=target["url"][:-4] + "0000")
    assert await put(stack, tampered, bodies[0]) == 403
    assert await put(stack, target, bodies[0][::-1]) == 400  # BadDigest
    completion = await stack.error(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}]})
    assert completion["extensions"]["code"] == "UPLOAD_INCOMPLETE"

    assert await put(stack, target, bodies[0]) == 200
    done = await stack.data(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}]})
    assert done["completeMaskUpload"]["maskGroup"]["status"] == "COMPLETE"
    deleted = (await stack.data(DELETE_GROUP, {"id": group_id}))["deleteMaskGroup"]
    assert deleted["deletedObjectCount"] == 1


async def test_seaweedfs_refuses_what_it_must(postgres_s3_stack: Stack) -> None:
    """The main stack, PostgreSQL + SeaweedFS, which checks signatures, expiry and Content-MD5."""
    try:
        await refuses_what_it_must(postgres_s3_stack)
    finally:
        await reset(postgres_s3_stack)


async def test_rclone_refuses_what_it_must(
    rclone_server: RcloneServer, own_sqlite_url: str, tmp_path: Path
) -> None:
    """Against `rclone serve s3`, which checks the same as a second implementation."""
    settings = s3_settings(
        rclone_server.endpoint_url, rclone_server.access_key, rclone_server.secret_key, "pacs-masks"
    ).model_copy(update={"database_url": own_sqlite_url, "var_dir": tmp_path})
    async with open_stack("sqlite-rclone", settings, ensure_bucket=False) as stack:
        await refuses_what_it_must(stack)
        assert not list((rclone_server.root / "pacs-masks").rglob("*.png"))
