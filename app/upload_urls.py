"""Issuing presigned PUT URLs for a batch of slices, and recording what each will hold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import Actor, record
from app.config import Settings
from app.errors import Conflict
from app.models import MaskGroup, MaskUpload
from app.principals import Role, require
from app.slices import (
    MASK,
    SliceName,
    check_batch_size,
    check_slice_identity,
    lock_own_group,
    rows_in_range,
    slice_name,
)
from app.storage import SignedRequest, Storage, mask_key, md5_base64_to_hex
from app.validation import Problems, signed_url_ttl

MASK_UPLOAD = cast(Table, MaskUpload.__table__)


@dataclass(frozen=True, slots=True)
class SliceUpload:
    slice_index: int
    label_name: str | None
    content_type: str
    file_size: int
    content_md5: str


@dataclass(frozen=True, slots=True)
class UploadTarget:
    slice_index: int
    label_name: str | None
    file_path: str
    request: SignedRequest


def _check_slices(
    settings: Settings,
    group: MaskGroup,
    slices: Sequence[SliceUpload],
    problems: Problems,
    seen: set[SliceName],
) -> list[str]:
    """The hex MD5 of each slice ("" where refused)."""
    md5_hexes: list[str] = []
    allowed = set(settings.allowed_content_types)
    for item in slices:
        check_slice_identity(problems, seen, group, item.slice_index, item.label_name)
        if item.content_type not in allowed:
            problems.add(
                item.slice_index,
                "contentType",
                f"contentType must be one of {', '.join(settings.allowed_content_types)}",
            )
        if not 1 <= item.file_size <= settings.max_mask_size_bytes:
            problems.add(
                item.slice_index,
                "fileSize",
                f"fileSize must be between 1 and {settings.max_mask_size_bytes} bytes",
            )
        md5_hex = md5_base64_to_hex(item.content_md5)
        if md5_hex is None:
            problems.add(
                item.slice_index, "contentMd5", "contentMd5 must be a base64 MD5 digest (RFC 1864)"
            )
        md5_hexes.append(md5_hex or "")
    return md5_hexes


async def request_upload_urls(
    session: AsyncSession,
    storage: Storage,
    settings: Settings,
    actor: Actor,
    *,
    group_id: int,
    slices: Sequence[SliceUpload],
    ttl_seconds: int | None,
    now: datetime,
) -> list[UploadTarget]:
    require(actor.principal, Role.UPLOADER)
    check_batch_size(settings, len(slices))
    ttl = signed_url_ttl(settings, ttl_seconds)
    group = await lock_own_group(session, actor, group_id)

    problems = Problems()
    seen: set[SliceName] = set()
    md5_hexes = _check_slices(settings, group, slices, problems, seen)
    problems.raise_if_any()

    indexes = [item.slice_index for item in slices]
    registered = await rows_in_range(session, MASK, group_id, indexes)
    conflicts = Problems()
    for item in slices:
        if slice_name(item.slice_index, item.label_name) in registered:
            conflicts.add(item.slice_index, "sliceIndex", "slice is already registered")
    conflicts.raise_if_any(Conflict)

    # A fresh URL replaces what an earlier call declared for the same slice.
    previous = await rows_in_range(session, MASK_UPLOAD, group_id, indexes)
    replaced = [row.id for name, row in previous.items() if name in seen]
    if replaced:
        await session.execute(delete(MaskUpload).where(MaskUpload.id.in_(replaced)))

    expires_at = now + timedelta(seconds=ttl)
    rows: list[dict[str, Any]] = []
    targets: list[UploadTarget] = []
    for item, md5_hex in zip(slices, md5_hexes, strict=True):
        key = mask_key(
            group.annotation_id, group.id, item.slice_index, item.label_name, item.content_type
        )
        rows.append(
            {
                "mask_group_id": group.id,
                "slice_index": item.slice_index,
                "label_name": item.label_name,
                "file_path": key,
                "content_type": item.content_type,
                "file_size": item.file_size,
                "content_md5": md5_hex,
                "expires_at": expires_at,
                "created_at": now,
            }
        )
        signed = storage.presign_put(
            key,
            content_type=item.content_type,
            content_md5=item.content_md5,
            content_length=item.file_size,
            expires_in=ttl,
            now=now,
        )
        targets.append(UploadTarget(item.slice_index, item.label_name, key, signed))
    await session.execute(insert(MaskUpload), rows)
    if group.upload_expires_at is None or group.upload_expires_at < expires_at:
        group.upload_expires_at = expires_at
    await session.flush()
    await record(
        session,
        actor,
        "upload_urls.issue",
        group=group,
        detail={"ttlSeconds": ttl},
        slice_count=len(slices),
        byte_count=sum(item.file_size for item in slices),
    )
    return targets
