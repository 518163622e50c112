"""Concurrent batches on one group: serialised, never duplicated, never half-written."""

from __future__ import annotations

import asyncio

from conftest import Stack
from flows import create_annotation, create_group, upload
from operations import COMPLETE
from sqlalchemy import func, select

from app.models import Mask, MaskGroup


async def test_concurrent_completions_register_each_slice_once(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 40)
    await upload(stack, group_id, range(40), complete=False)
    batches = [[{"sliceIndex": i} for i in range(start, 40, 4)] for start in range(4)]
    batches += [[{"sliceIndex": i} for i in range(40)]] * 2
    results = await asyncio.gather(
        *(stack.gql(COMPLETE, {"groupId": group_id, "slices": batch}) for batch in batches)
    )
    for result in results:
        assert "errors" not in result, result
    async with stack.sessionmaker() as session:
        masks = await session.scalar(select(func.count()).select_from(Mask))
        stored_bytes = await session.scalar(select(func.sum(Mask.file_size)))
        group = await session.get(MaskGroup, int(group_id))
    assert masks == 40
    assert group is not None
    assert group.uploaded_slice_count == 40
    # Each slice's bytes counted once, however the batches raced.
    assert stored_bytes is not None
    assert group.total_bytes == stored_bytes
    final = await stack.data(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}]})
    assert final["completeMaskUpload"]["maskGroup"]["status"] == "COMPLETE"
    assert final["completeMaskUpload"]["maskGroup"]["totalBytes"] == group.total_bytes
