"""Who may do what: every operation × every kind of caller, with the audit trail to match."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from conftest import Stack, content_md5, png_bytes
from flows import create_annotation, create_group, upload
from operations import COMPLETE, CREATE_ANNOTATION, CREATE_GROUP, DELETE_GROUP, REQUEST_URLS
from sqlalchemy import func, select

from app.audit import Actor
from app.db import transaction
from app.models import Annotation, AuditEvent, Mask, MaskGroup, MaskUpload, utcnow
from app.principals import Principal, Role
from app.tokens import create_token, revoke_token

CALLERS = ["none", "unknown", "expired", "revoked", "reader", "uploader", "other", "admin"]
OK, FORBIDDEN, UNAUTHENTICATED = "ok", "FORBIDDEN", "UNAUTHENTICATED"

# What each operation allows, by caller; the four unauthenticated callers are always refused.
RULES: dict[str, dict[str, str]] = {
    "annotation": {"reader": OK, "uploader": OK, "other": OK, "admin": OK},
    "annotations": {"reader": OK, "uploader": OK, "other": OK, "admin": OK},
    "maskGroup": {"reader": OK, "uploader": OK, "other": OK, "admin": OK},
    "mask": {"reader": OK, "uploader": OK, "other": OK, "admin": OK},
    "me": {"reader": OK, "uploader": OK, "other": OK, "admin": OK},
    "auditEvents": {"reader": FORBIDDEN, "uploader": FORBIDDEN, "other": FORBIDDEN, "admin": OK},
    "createAnnotation": {"reader": FORBIDDEN, "uploader": OK, "other": OK, "admin": OK},
    "createMaskGroup": {"reader": FORBIDDEN, "uploader": OK, "other": OK, "admin": OK},
    "requestMaskUploadUrls": {
        "reader": FORBIDDEN,
        "uploader": OK,
        "other": FORBIDDEN,
        "admin": OK,
    },
    "completeMaskUpload": {"reader": FORBIDDEN, "uploader": OK, "other": FORBIDDEN, "admin": OK},
    "deleteMaskGroup": {"reader": FORBIDDEN, "uploader": OK, "other": FORBIDDEN, "admin": OK},
    "view": {"reader": OK, "uploader": OK, "other": OK, "admin": OK},
}
MUTATIONS = {
    "createAnnotation": "annotation.create",
    "createMaskGroup": "mask_group.create",
    "requestMaskUploadUrls": "upload_urls.issue",
    "completeMaskUpload": "upload.complete",
    "deleteMaskGroup": "mask_group.delete",
}
USERS = {"reader": "reader-1", "uploader": "uploader-1", "other": "uploader-2", "admin": "admin-1"}


def expected(operation: str, caller: str) -> str:
    return RULES[operation].get(caller, UNAUTHENTICATED)


async def _token(stack: Stack, caller: str) -> str | None:
    if caller == "none":
        return None
    if caller == "unknown":
        return "pmk_" + "x" * 43
    if caller in ("expired", "revoked"):
        actor = Actor(Principal("test-setup", Role.ADMIN))
        async with transaction(stack.sessionmaker) as session:
            token, secret = await create_token(
                session,
                actor,
                user=f"{caller}-admin",
                role=Role.ADMIN,
                expires_in=timedelta(seconds=-1) if caller == "expired" else None,
                now=utcnow(),
            )
            if caller == "revoked":
                await revoke_token(session, actor, token.id, utcnow())
        return secret
    return stack.tokens[caller]


async def _counts(stack: Stack) -> list[int]:
    async with stack.sessionmaker() as session:
        return [
            (await session.scalar(select(func.count()).select_from(model))) or 0
            for model in (Annotation, MaskGroup, Mask, MaskUpload, AuditEvent)
        ]


async def _setup(stack: Stack) -> dict[str, Any]:
    """An annotation and a group of uploader-1's, slice 0 registered, slice 1 uploaded."""
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 3)
    done = await upload(stack, group_id, [0])
    await upload(stack, group_id, [1], complete=False)
    return {"annotation": annotation_id, "group": group_id, "mask": done["masks"][0]["id"]}


def _request(operation: str, ids: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    body = png_bytes(2)
    return {
        "annotation": ("query($id: ID!) { annotation(id: $id) { id } }", {"id": ids["annotation"]}),
        "annotations": ("{ annotations { id } }", {}),
        "maskGroup": ("query($id: ID!) { maskGroup(id: $id) { id } }", {"id": ids["group"]}),
        "mask": ("query($id: ID!) { mask(id: $id) { id } }", {"id": ids["mask"]}),
        "me": ("{ me { user role } }", {}),
        "auditEvents": ("{ auditEvents(limit: 5) { id action } }", {}),
        "createAnnotation": (CREATE_ANNOTATION, {"input": {"studyInstanceUid": "1.2.9"}}),
        "createMaskGroup": (CREATE_GROUP, {"input": {"annotationId": ids["annotation"]}}),
        "requestMaskUploadUrls": (
            REQUEST_URLS,
            {
                "groupId": ids["group"],
                "slices": [
                    {"sliceIndex": 2, "fileSize": len(body), "contentMd5": content_md5(body)}
                ],
            },
        ),
        "completeMaskUpload": (COMPLETE, {"groupId": ids["group"], "slices": [{"sliceIndex": 1}]}),
        "deleteMaskGroup": (DELETE_GROUP, {"id": ids["group"]}),
    }[operation]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("operation", list(RULES))
async def test_access(stack: Stack, operation: str, caller: str) -> None:
    ids = await _setup(stack)
    token = await _token(stack, caller)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    before = await _counts(stack)
    outcome = expected(operation, caller)

    if operation == "view":
        # The stack's client carries uploader-1's token by default; replace or drop it.
        response = await stack.storage_client.get(
            f"{stack.base_url}/api/mask-group/{ids['group']}/view",
            params={"slice": 0},
            headers=headers,
        )
        assert response.status_code == (200 if outcome == OK else 401)
        if outcome == OK:
            assert response.headers["cache-control"].startswith("private")
        assert await _counts(stack) == before
        return

    query, variables = _request(operation, ids)
    response = await stack.storage_client.post(
        f"{stack.base_url}/graphql", json={"query": query, "variables": variables}, headers=headers
    )
    body = response.json()
    if outcome == UNAUTHENTICATED:
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert body["errors"][0]["extensions"]["code"] == UNAUTHENTICATED
        assert "data" not in body
        assert await _counts(stack) == before
        return
    assert response.status_code == 200
    if outcome == FORBIDDEN:
        assert body["errors"][0]["extensions"]["code"] == FORBIDDEN, body
        assert await _counts(stack) == before
        return
    assert "errors" not in body, body
    if operation == "me":
        user, role = USERS[caller], {"other": "uploader"}.get(caller, caller).upper()
        assert body["data"]["me"] == {"user": user, "role": role}
    if operation in MUTATIONS:
        async with stack.sessionmaker() as session:
            event = (
                await session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1))
            ).one()
        assert (event.actor, event.action) == (USERS[caller], MUTATIONS[operation])
        assert event.request_id == response.headers["x-request-id"]
    if operation in ("createAnnotation", "createMaskGroup"):
        created = next(iter(body["data"].values()))
        async with stack.sessionmaker() as session:
            model = Annotation if operation == "createAnnotation" else MaskGroup
            row = await session.get(model, int(created["id"]))
        assert row is not None
        assert row.created_by == USERS[caller]
