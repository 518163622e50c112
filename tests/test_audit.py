"""The audit trail: one record per action, none for refused or rolled-back ones, append-only."""

from __future__ import annotations

import pytest
from conftest import Stack
from flows import create_annotation, create_group, upload
from operations import COMPLETE, DELETE_GROUP, REQUEST_URLS
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError

from app.models import AuditEvent

AUDIT = """query($annotationId: ID, $maskGroupId: ID, $actor: String, $action: String, $limit: Int!, $offset: Int!) {
  auditEvents(annotationId: $annotationId, maskGroupId: $maskGroupId, actor: $actor,
              action: $action, limit: $limit, offset: $offset) {
    id occurredAt actor action annotationId maskGroupId sliceCount byteCount requestId
    clientIp userAgent detail
  }
}"""


async def _events(stack: Stack, **filters: object) -> list[dict[str, object]]:
    variables = {"limit": 100, "offset": 0, **filters}
    events: list[dict[str, object]] = (await stack.data(AUDIT, variables, as_="admin"))[
        "auditEvents"
    ]
    return events


async def _audit_count(stack: Stack) -> int:
    async with stack.sessionmaker() as session:
        return (await session.scalar(select(func.count()).select_from(AuditEvent))) or 0


async def test_each_action_is_recorded_with_its_context(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    done = await upload(stack, group_id, [0, 1])
    await stack.data(DELETE_GROUP, {"id": group_id})

    events = await _events(stack, annotationId=annotation_id)
    assert [event["action"] for event in events] == [
        "mask_group.delete",
        "upload.complete",
        "upload_urls.issue",
        "mask_group.create",
        "annotation.create",
    ]
    assert {event["actor"] for event in events} == {"uploader-1"}
    assert {event["clientIp"] for event in events} == {"127.0.0.1"}
    assert all(str(event["userAgent"]).startswith("python-httpx/") for event in events)
    assert all(event["requestId"] for event in events)
    total = done["maskGroup"]["totalBytes"]
    by_action = {event["action"]: event for event in events}
    assert by_action["upload_urls.issue"]["sliceCount"] == 2
    assert by_action["upload_urls.issue"]["byteCount"] == total
    assert by_action["upload_urls.issue"]["detail"] == {"ttlSeconds": 600}
    assert by_action["upload.complete"]["sliceCount"] == 2
    assert by_action["upload.complete"]["byteCount"] == total
    assert by_action["mask_group.delete"]["sliceCount"] == 2
    assert by_action["mask_group.delete"]["byteCount"] == total
    assert by_action["mask_group.delete"]["maskGroupId"] == group_id
    # The record outlives the group it describes.
    assert len(await _events(stack, maskGroupId=group_id)) == 4


async def test_refused_and_rolled_back_actions_leave_no_record(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    before = await _audit_count(stack)
    # Bad input, a forbidden caller, and a completion that fails after its checks began.
    bad = await stack.error(REQUEST_URLS, {"groupId": group_id, "slices": []})
    assert bad["extensions"]["code"] == "BAD_USER_INPUT"
    forbidden = await stack.error(DELETE_GROUP, {"id": group_id}, as_="other")
    assert forbidden["extensions"]["code"] == "FORBIDDEN"
    await upload(stack, group_id, [0], complete=False)
    after_issue = await _audit_count(stack)
    assert after_issue == before + 1
    incomplete = await stack.error(
        COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}, {"sliceIndex": 1}]}
    )
    assert incomplete["extensions"]["code"] == "UPLOAD_INCOMPLETE"
    assert await _audit_count(stack) == after_issue


async def test_filters_paging_and_order(stack: Stack) -> None:
    first = await create_annotation(stack)
    second = await create_annotation(stack)
    await stack.data(
        'mutation { createAnnotation(input: {studyInstanceUid: "1.5"}) { id } }', as_="admin"
    )
    mine = await _events(stack, actor="uploader-1", action="annotation.create")
    ids = [event["annotationId"] for event in mine]
    assert ids.index(second) < ids.index(first)  # newest first
    assert all(event["actor"] == "uploader-1" for event in mine)
    admin_events = await _events(stack, actor="admin-1", action="annotation.create")
    assert admin_events
    page = await _events(stack, action="annotation.create", limit=1, offset=1)
    assert len(page) == 1
    error = await stack.error(AUDIT, {"limit": 0, "offset": 0}, as_="admin")
    assert error["extensions"]["code"] == "BAD_USER_INPUT"


async def test_the_table_is_append_only(stack: Stack) -> None:
    await create_annotation(stack)
    for statement in (update(AuditEvent).values(actor="someone else"), delete(AuditEvent)):
        with pytest.raises(DBAPIError, match="append-only"):
            async with stack.sessionmaker() as session, session.begin():
                await session.execute(statement)
