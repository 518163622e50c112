"""The whole upload sequence over HTTP, on SQLite + local disk and PostgreSQL + moto S3."""

from __future__ import annotations

import asyncio

import httpx
from conftest import Stack, content_md5, png_bytes
from flows import create_annotation, create_group, put, slice_inputs
from operations import COMPLETE, DELETE_GROUP, REQUEST_URLS, TREE


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
    assert tumor["viewUrl"] == f"/api/mask-group/{group_id}/view?slice=1&label=tumor"

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
        "storageCleanupPending": False,
    }
    assert await stack.storage.stat_objects([target["filePath"] for target in targets]) == {}
    assert (await stack.data("query($id: ID!) { maskGroup(id: $id) { id } }", {"id": group_id}))[
        "maskGroup"
    ] is None
    gone = await stack.client.get(f"/api/mask-group/{group_id}/view", params={"slice": 1})
    assert gone.status_code == 404
