"""Reads: the tree in a constant number of statements, filters, paging, lookups."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Stack, count_statements
from flows import create_annotation, create_group, upload
from operations import TREE
from sqlalchemy import insert

from app.graphql import loaders
from app.models import Mask, MaskGroup, MaskGroupStatus, utcnow


async def _seed_tree(stack: Stack, groups: int, masks: int) -> str:
    """Rows straight into the database: the statement count is about reads, not uploads."""
    annotation_id = await create_annotation(stack)
    now = utcnow()
    async with stack.sessionmaker() as session, session.begin():
        group_ids = (
            await session.scalars(
                insert(MaskGroup).returning(MaskGroup.id),
                [
                    {
                        "annotation_id": int(annotation_id),
                        "slice_count": masks,
                        "mask_type": "segmentation",
                        "status": MaskGroupStatus.COMPLETE,
                        "uploaded_slice_count": masks,
                        "total_bytes": masks * 100,
                        "created_at": now,
                    }
                    for _ in range(groups)
                ],
            )
        ).all()
        rows: list[dict[str, Any]] = [
            {
                "mask_group_id": group_id,
                "slice_index": index,
                "file_path": f"mask/{annotation_id}/{group_id}/slice_{index:05d}.png",
                "mime_type": "image/png",
                "file_size": 100,
                "checksum": "md5:" + "0" * 32,
                "created_at": now,
            }
            for group_id in group_ids
            for index in range(masks)
        ]
        await session.execute(insert(Mask), rows)
    return annotation_id


async def _tree_statements(stack: Stack, annotation_id: str) -> tuple[int, dict[str, Any]]:
    with count_statements(stack.services.engine) as statements:
        data = await stack.data(TREE, {"id": annotation_id})
    # The token lookup is kept for TOKEN_CACHE_SECONDS, so whether it runs depends on when
    # the token was last used, not on the tree.
    return len([s for s in statements if "api_token" not in s]), data


async def test_tree_runs_a_constant_number_of_statements(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loaders, "STREAM_ROWS", 500)
    small = await _seed_tree(stack, groups=2, masks=3)
    medium = await _seed_tree(stack, groups=3, masks=200)
    large = await _seed_tree(stack, groups=10, masks=1000)
    small_count, _ = await _tree_statements(stack, small)
    medium_count, _ = await _tree_statements(stack, medium)
    large_count, data = await _tree_statements(stack, large)
    groups = data["annotation"]["maskGroups"]
    assert len(groups) == 10
    assert sum(len(group["masks"]) for group in groups) == 10_000
    # The annotation, its groups, their masks (group.annotation: loader cache).
    assert small_count <= 3
    # Masks past one round trip's worth are asked again, streamed: one statement more,
    # whatever the size.
    assert large_count == medium_count == small_count + 1


async def test_annotations_list_with_groups_is_constant(stack: Stack) -> None:
    for _ in range(3):
        await _seed_tree(stack, groups=2, masks=2)
    query = """{ annotations(limit: 10) { id maskGroups { id masks { id } annotation { id } } } }"""
    with count_statements(stack.services.engine) as statements:
        data = await stack.data(query)
    assert len(data["annotations"]) == 3
    assert len(statements) <= 4  # the token lookup, annotations, groups, masks


async def test_mask_filters_and_paging(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 6)
    await upload(stack, group_id, range(6))
    await upload(stack, group_id, [2, 3], label="tumor")
    query = """query($id: ID!, $from: Int, $to: Int, $label: String, $limit: Int, $offset: Int!) {
      maskGroup(id: $id) { masks(sliceIndexFrom: $from, sliceIndexTo: $to, labelName: $label,
                                 limit: $limit, offset: $offset) { sliceIndex labelName } } }"""

    async def masks(**args: Any) -> list[tuple[int, str | None]]:
        variables = {"id": group_id, "offset": 0, **args}
        data = await stack.data(query, variables)
        return [(m["sliceIndex"], m["labelName"]) for m in data["maskGroup"]["masks"]]

    assert await masks(**{"from": 2, "to": 3}) == [(2, None), (2, "tumor"), (3, None), (3, "tumor")]
    assert await masks(label="tumor") == [(2, "tumor"), (3, "tumor")]
    assert await masks(limit=2, offset=3) == [(2, "tumor"), (3, None)]
    assert await masks(offset=7) == [(5, None)]
    error = await stack.error(query, {"id": group_id, "offset": -1})
    assert error["extensions"]["code"] == "BAD_USER_INPUT"


async def test_annotations_filter_by_uids_newest_first(stack: Stack) -> None:
    first = await create_annotation(stack, "1.2.3")
    second = await create_annotation(stack, "1.2.3")
    await create_annotation(stack, "1.2.4")
    query = """query($study: String, $series: String, $limit: Int!, $offset: Int!) {
      annotations(studyInstanceUid: $study, seriesInstanceUid: $series, limit: $limit, offset: $offset) { id } }"""
    data = await stack.data(query, {"study": "1.2.3", "limit": 50, "offset": 0})
    assert [a["id"] for a in data["annotations"]] == [second, first]
    data = await stack.data(query, {"study": "1.2.3", "series": "1.2.3.1", "limit": 1, "offset": 1})
    assert [a["id"] for a in data["annotations"]] == [first]
    error = await stack.error(query, {"limit": 0, "offset": 0})
    assert error["extensions"]["code"] == "BAD_USER_INPUT"


async def test_lookups_of_missing_ids_are_null(stack: Stack) -> None:
    data = await stack.data(
        '{ annotation(id: "99") { id } maskGroup(id: "98") { id } mask(id: "97") { id } }'
    )
    assert data == {"annotation": None, "maskGroup": None, "mask": None}
    error = await stack.error('{ annotation(id: "x1") { id } }')
    assert error["extensions"]["code"] == "BAD_USER_INPUT"


async def test_group_fields(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(
        stack,
        annotation_id,
        3,
        groupName="liver",
        modelName="nnunet",
        version="1.0",
        modality="CT",
        description="auto",
        confidence=0.93,
        inferenceParameters={"threshold": 0.5, "checkpoint": "a1"},
    )
    await upload(stack, group_id, [1])
    query = """query($id: ID!) { maskGroup(id: $id) { id annotationId groupName modelName version
      modality sliceCount maskType description confidence inferenceParameters createdBy status
      uploadedSliceCount missingSliceIndexes totalBytes annotation { id } } }"""
    group = (await stack.data(query, {"id": group_id}))["maskGroup"]
    assert group["annotationId"] == annotation_id
    assert group["annotation"] == {"id": annotation_id}
    assert group["status"] == "UPLOADING"
    assert group["missingSliceIndexes"] == [0, 2]
    assert group["inferenceParameters"] == {"threshold": 0.5, "checkpoint": "a1"}
    assert group["confidence"] == 0.93
    assert (group["modelName"], group["version"], group["modality"]) == ("nnunet", "1.0", "CT")
