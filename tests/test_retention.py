"""DELETED_GROUP_RETENTION over HTTP, on SQLite + local disk and PostgreSQL + S3 (moto's
server): a deleted group is invisible everywhere at once, restoreMaskGroup brings back the
same masks and bytes within the window, and the sweeper purges rows and objects after it.
Retention 0 (every other test file) keeps the immediate delete."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import pytest
from conftest import Stack, base_settings, open_stack, reset
from flows import create_annotation, create_group, slice_inputs, upload
from operations import COMPLETE, DELETE_GROUP, REQUEST_URLS, TREE
from sqlalchemy import func, select
from test_events import live, subscribers

from app.config import Settings
from app.jobs import JobContext
from app.models import INCLUDE_DELETED, AuditEvent, Mask, MaskGroup, utcnow
from app.sweeper import sweep

RETENTION = 30 * 86_400

RESTORE = """
mutation($id: ID!) {
  restoreMaskGroup(id: $id) { id status uploadedSliceCount totalBytes
    masks { id sliceIndex filePath fileSize checksum viewUrl } }
}"""

LOOKUPS = """
query($group: ID!, $mask: ID!) {
  maskGroup(id: $group) { id }
  mask(id: $mask) { id downloadUrl { url } }
}"""


@pytest.fixture(params=["sqlite-local", "postgresql-s3"])
def retained_settings(request: pytest.FixtureRequest) -> Settings:
    if request.param == "sqlite-local":
        url: str = request.getfixturevalue("own_sqlite_url")
        var_dir = request.getfixturevalue("tmp_path_factory").mktemp("var")
        settings = base_settings(database_url=url, var_dir=var_dir, storage_provider="local")
    else:
        from storage_servers import s3_settings

        moto = request.getfixturevalue("moto_server")
        bucket = f"pacs-masks-{secrets.token_hex(4)}"
        settings = s3_settings(moto.endpoint_url, "testing", "testing", bucket).model_copy(
            update={
                "database_url": request.getfixturevalue("postgres_url"),
                "var_dir": request.getfixturevalue("tmp_path_factory").mktemp("var"),
            }
        )
    return settings.model_copy(update={"deleted_group_retention": RETENTION})


async def _keys(stack: Stack) -> set[str]:
    return {item.key async for page in stack.storage.list_objects("mask/") for item in page}


async def _view(stack: Stack, url: str) -> tuple[int, bytes]:
    response = await stack.client.get(url, follow_redirects=True)
    if response.is_redirect or response.status_code != 200:
        return response.status_code, b""
    return response.status_code, response.content


async def _fetch(stack: Stack, url: str) -> bytes:
    response = await stack.client.get(url)
    if response.status_code in (302, 303, 307):
        response = await stack.storage_client.get(response.headers["location"])
    assert response.status_code == 200, response.text
    return response.content


async def _invisible(stack: Stack, annotation_id: str, group_id: str, masks: list[Any]) -> None:
    tree = (await stack.data(TREE, {"id": annotation_id}, as_="admin"))["annotation"]
    assert tree["maskGroups"] == []
    found = await stack.data(LOOKUPS, {"group": group_id, "mask": masks[0]["id"]}, as_="admin")
    assert found == {"maskGroup": None, "mask": None}
    view = await stack.client.get(masks[0]["viewUrl"])
    assert view.status_code == 404
    seg = await stack.client.get(f"/api/mask-group/{group_id}/seg.dcm")
    assert seg.status_code == 404
    slices, _ = slice_inputs([0], None, lambda index: b"x")
    refused = await stack.error(REQUEST_URLS, {"groupId": group_id, "slices": slices})
    assert refused["extensions"]["code"] == "NOT_FOUND"
    refused = await stack.error(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}]})
    assert refused["extensions"]["code"] == "NOT_FOUND"
    again = await stack.error(DELETE_GROUP, {"id": group_id})
    assert again["extensions"]["code"] == "NOT_FOUND"


async def _rows(stack: Stack, group_id: str) -> tuple[int, int]:
    async with stack.sessionmaker() as session:
        groups = await session.scalar(
            select(func.count())
            .select_from(MaskGroup)
            .where(MaskGroup.id == int(group_id))
            .execution_options(**INCLUDE_DELETED)
        )
        masks = await session.scalar(
            select(func.count())
            .select_from(Mask)
            .where(Mask.mask_group_id == int(group_id))
            .execution_options(**INCLUDE_DELETED)
        )
    return groups or 0, masks or 0


async def _actions(stack: Stack, group_id: str) -> list[str]:
    async with stack.sessionmaker() as session:
        rows = await session.scalars(
            select(AuditEvent.action)
            .where(AuditEvent.mask_group_id == int(group_id))
            .order_by(AuditEvent.id)
        )
        return list(rows)


async def test_delete_hides_restore_brings_back_sweeper_purges(
    retained_settings: Settings,
) -> None:
    async with open_stack("retained", retained_settings) as stack:
        try:
            await _delete_restore_purge(stack)
        finally:
            # The PostgreSQL database is the session's, shared with the other files.
            await reset(stack)


async def _delete_restore_purge(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    completed = await upload(stack, group_id, range(2))
    masks = completed["masks"]
    bodies = {mask["id"]: await _fetch(stack, mask["viewUrl"]) for mask in masks}
    stored = await _keys(stack)

    deleted = (await stack.data(DELETE_GROUP, {"id": group_id}))["deleteMaskGroup"]
    assert deleted == {
        "id": group_id,
        "deletedMaskCount": 2,
        "deletedObjectCount": 0,
        "storageCleanupPending": True,
    }
    await _invisible(stack, annotation_id, group_id, masks)
    assert await _keys(stack) == stored
    assert await _rows(stack, group_id) == (1, 2)
    # A sweep inside the window touches nothing, not even as upload debris.
    context = JobContext(stack.settings, stack.sessionmaker, stack.storage, "test")
    late = utcnow() + timedelta(seconds=stack.settings.cleanup_grace + 60)
    early = await sweep(context, now=late)
    assert (early.deletions_processed, early.debris_objects) == (0, 0)
    assert await _keys(stack) == stored

    forbidden = await stack.error(RESTORE, {"id": group_id}, as_="uploader")
    assert forbidden["extensions"]["code"] == "FORBIDDEN"
    restored = (await stack.data(RESTORE, {"id": group_id}, as_="admin"))["restoreMaskGroup"]
    assert restored["status"] == "COMPLETE"
    assert [mask["id"] for mask in restored["masks"]] == [mask["id"] for mask in masks]
    for mask in restored["masks"]:
        assert await _fetch(stack, mask["viewUrl"]) == bodies[mask["id"]]
    tree = (await stack.data(TREE, {"id": annotation_id}))["annotation"]
    assert [group["id"] for group in tree["maskGroups"]] == [group_id]
    conflict = await stack.error(RESTORE, {"id": group_id}, as_="admin")
    assert conflict["extensions"]["code"] == "CONFLICT"
    unknown = await stack.error(RESTORE, {"id": "999999"}, as_="admin")
    assert unknown["extensions"]["code"] == "NOT_FOUND"

    # Deleted again: after the window, the sweeper purges rows and objects.
    await stack.data(DELETE_GROUP, {"id": group_id})
    purged = await sweep(context, now=utcnow() + timedelta(seconds=RETENTION + 60))
    assert (purged.deletions_processed, purged.deletions_finished) == (1, 1)
    assert purged.deleted_objects == 2
    assert await _keys(stack) == set()
    assert await _rows(stack, group_id) == (0, 0)
    gone = await stack.error(RESTORE, {"id": group_id}, as_="admin")
    assert gone["extensions"]["code"] == "NOT_FOUND"
    actions = await _actions(stack, group_id)
    assert [action for action in actions if action.startswith("mask_group.")][-3:] == [
        "mask_group.delete",
        "mask_group.restore",
        "mask_group.delete",
    ]


async def test_subscribers_see_the_delete_and_the_restore(retained_settings: Settings) -> None:
    async with open_stack("retained", retained_settings) as stack:
        try:
            annotation_id = await create_annotation(stack)
            async with live(stack.base_url, stack.tokens["reader"]) as client:
                await client.subscribe(annotation_id)
                await subscribers(stack, annotation_id)
                group_id = await create_group(stack, annotation_id, 1)
                assert (await client.event())["kind"] == "CREATED"
                await stack.data(DELETE_GROUP, {"id": group_id})
                deleted = await client.event()
                assert (deleted["kind"], deleted["maskGroupId"]) == ("DELETED", group_id)
                await stack.data(RESTORE, {"id": group_id}, as_="admin")
                restored = await client.event()
                assert (restored["kind"], restored["maskGroupId"]) == ("CREATED", group_id)
        finally:
            await reset(stack)
