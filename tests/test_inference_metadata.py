"""Model metadata: per-slice confidence is validated on completion and shown in the tree."""

from __future__ import annotations

from conftest import Stack
from flows import create_annotation, create_group, upload
from operations import COMPLETE

TREE = """query($id: ID!) { maskGroup(id: $id) {
  confidence inferenceParameters masks { sliceIndex confidence } } }"""


async def test_slice_confidence_is_stored_and_shown(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(
        stack, annotation_id, 2, confidence=0.8, inferenceParameters={"threshold": 0.5}
    )
    await upload(stack, group_id, range(2), complete=False)
    refused = await stack.error(
        COMPLETE,
        {
            "groupId": group_id,
            "slices": [
                {"sliceIndex": 0, "confidence": 0.25},
                {"sliceIndex": 1, "confidence": 1.5},
            ],
        },
    )
    assert refused["extensions"]["code"] == "BAD_USER_INPUT"
    assert refused["extensions"]["problems"] == [
        {"sliceIndex": 1, "field": "confidence", "message": "confidence must be between 0 and 1"}
    ]
    # All-or-nothing: slice 0 was not registered either.
    assert (await stack.data(TREE, {"id": group_id}))["maskGroup"]["masks"] == []

    await stack.data(
        COMPLETE,
        {
            "groupId": group_id,
            "slices": [{"sliceIndex": 0, "confidence": 0.25}, {"sliceIndex": 1}],
        },
    )
    group = (await stack.data(TREE, {"id": group_id}))["maskGroup"]
    assert group["confidence"] == 0.8
    assert group["inferenceParameters"] == {"threshold": 0.5}
    assert group["masks"] == [
        {"sliceIndex": 0, "confidence": 0.25},
        {"sliceIndex": 1, "confidence": None},
    ]
