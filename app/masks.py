"""Domain operations on annotations, mask groups and masks.

Plain async functions over a session; they add and flush, never commit: the caller owns the
transaction, so a batch either lands whole or not at all.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Row, Table, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit import Actor, record
from app.auth import Role, require, require_owner
from app.config import Settings
from app.db import transaction
from app.errors import (
    BadUserInput,
    ChecksumMismatch,
    Conflict,
    NotFound,
    StorageUnavailable,
    UploadIncomplete,
)
from app.models import (
    Annotation,
    Mask,
    MaskGroup,
    MaskGroupStatus,
    MaskUpload,
    StorageDeletion,
    utcnow,
)
from app.storage import (
    LABEL_PATTERN,
    SignedRequest,
    Storage,
    StorageError,
    group_prefix,
    mask_key,
    md5_base64_to_hex,
)

logger = logging.getLogger(__name__)

MASK = cast(Table, Mask.__table__)
MASK_UPLOAD = cast(Table, MaskUpload.__table__)

# DICOM PS3.5 §9.1: digits and dots, no leading zeros in a component, at most 64 characters.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX_LENGTH = 64
SHORT_TEXT_MAX = 256
DESCRIPTION_MAX = 4000
MODALITY_MAX = 16
MAX_DIMENSION = 65535
MAX_PROBLEMS_REPORTED = 50


def validate_uid(field: str, value: str | None, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise BadUserInput(f"{field} is required", field=field)
        return None
    if len(value) > UID_MAX_LENGTH or not UID_PATTERN.match(value):
        raise BadUserInput(
            f"{field} must be a DICOM UID (digits and dots, at most 64 characters)", field=field
        )
    return value


def validate_text(field: str, value: str | None, max_length: int = SHORT_TEXT_MAX) -> str | None:
    if value is None:
        return None
    if len(value) > max_length:
        raise BadUserInput(f"{field} is longer than {max_length} characters", field=field)
    if any(ord(char) < 32 and char not in "\t\n\r" for char in value):
        raise BadUserInput(f"{field} contains control characters", field=field)
    return value


def parse_id(field: str, value: str) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise BadUserInput(f"{field} is not a valid id: {value[:40]!r}", field=field)
    return int(value)


@dataclass(frozen=True, slots=True)
class SliceUpload:
    slice_index: int
    label_name: str | None
    content_type: str
    file_size: int
    content_md5: str


@dataclass(frozen=True, slots=True)
class CompletedSlice:
    slice_index: int
    label_name: str | None
    sop_instance_uid: str | None = None
    width: int | None = None
    height: int | None = None
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class UploadTarget:
    slice_index: int
    label_name: str | None
    file_path: str
    request: SignedRequest


@dataclass(frozen=True, slots=True)
class GroupDeletion:
    mask_group_id: int
    prefix: str
    deleted_mask_count: int
    storage_deletion_id: int
    upload_expires_at: datetime | None


class _Problems:
    """Collects every offending slice of a batch so one error names them all."""

    def __init__(self) -> None:
        self.slice_indexes: list[int] = []
        self.details: list[dict[str, Any]] = []

    def add(self, slice_index: int, field: str, message: str) -> None:
        self.slice_indexes.append(slice_index)
        if len(self.details) < MAX_PROBLEMS_REPORTED:
            self.details.append({"sliceIndex": slice_index, "field": field, "message": message})

    def raise_if_any(self, error: type[BadUserInput | Conflict] = BadUserInput) -> None:
        if not self.slice_indexes:
            return
        count = len(set(self.slice_indexes))
        first = self.details[0]
        raise error(
            f"{count} slice(s) refused; slice {first['sliceIndex']}: {first['message']}",
            slice_indexes=self.slice_indexes,
            problems=self.details,
        )


def _slice_name(slice_index: int, label_name: str | None) -> tuple[int, str]:
    return (slice_index, label_name or "")


async def create_annotation(
    session: AsyncSession,
    actor: Actor,
    *,
    study_instance_uid: str,
    series_instance_uid: str | None,
    label: str | None,
) -> Annotation:
    require(actor.principal, Role.UPLOADER)
    annotation = Annotation(
        study_instance_uid=validate_uid("studyInstanceUid", study_instance_uid, required=True),
        series_instance_uid=validate_uid("seriesInstanceUid", series_instance_uid),
        label=validate_text("label", label),
        created_by=actor.principal.user,
        created_at=utcnow(),
    )
    session.add(annotation)
    await session.flush()
    await record(session, actor, "annotation.create", annotation_id=annotation.id)
    return annotation


async def create_mask_group(
    session: AsyncSession,
    settings: Settings,
    actor: Actor,
    *,
    annotation_id: int,
    group_name: str | None,
    model_name: str | None,
    version: str | None,
    modality: str | None,
    slice_count: int,
    mask_type: str,
    description: str | None,
    confidence: float | None,
    inference_parameters: Any,
) -> MaskGroup:
    require(actor.principal, Role.UPLOADER)
    if not 1 <= slice_count <= settings.max_slice_count:
        raise BadUserInput(
            f"sliceCount must be between 1 and {settings.max_slice_count}", field="sliceCount"
        )
    if not mask_type.strip():
        raise BadUserInput("maskType must not be empty", field="maskType")
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise BadUserInput("confidence must be between 0 and 1", field="confidence")
    group = MaskGroup(
        group_name=validate_text("groupName", group_name),
        model_name=validate_text("modelName", model_name),
        version=validate_text("version", version),
        modality=validate_text("modality", modality, MODALITY_MAX),
        slice_count=slice_count,
        mask_type=validate_text("maskType", mask_type, 64),
        description=validate_text("description", description, DESCRIPTION_MAX),
        confidence=confidence,
        inference_parameters=inference_parameters,
        created_by=actor.principal.user,
        created_at=utcnow(),
        status=MaskGroupStatus.PENDING,
        uploaded_slice_count=0,
        total_bytes=0,
    )
    annotation_exists = await session.scalar(
        select(Annotation.id).where(Annotation.id == annotation_id)
    )
    if annotation_exists is None:
        raise NotFound(f"annotation {annotation_id} does not exist", field="annotationId")
    group.annotation_id = annotation_id
    session.add(group)
    await session.flush()
    await record(
        session,
        actor,
        "mask_group.create",
        annotation_id=annotation_id,
        mask_group_id=group.id,
        slice_count=slice_count,
    )
    return group


async def _lock_own_group(
    session: AsyncSession, actor: Actor, group_id: int, field: str = "groupId"
) -> MaskGroup:
    # FOR UPDATE serialises batches of one group on PostgreSQL (SQLite: BEGIN IMMEDIATE).
    group = await session.scalar(
        select(MaskGroup).where(MaskGroup.id == group_id).with_for_update()
    )
    if group is None:
        raise NotFound(f"mask group {group_id} does not exist", field=field)
    require_owner(actor.principal, group.created_by, f"mask group {group_id}")
    return group


def _check_batch_size(settings: Settings, count: int) -> None:
    if count == 0:
        raise BadUserInput("slices must not be empty", field="slices")
    if count > settings.max_slices_per_call:
        raise BadUserInput(
            f"at most {settings.max_slices_per_call} slices per call, got {count}", field="slices"
        )


def _check_slice_identity(
    problems: _Problems, seen: set[tuple[int, str]], group: MaskGroup, index: int, label: str | None
) -> None:
    if not 0 <= index < group.slice_count:
        problems.add(index, "sliceIndex", f"sliceIndex must be in 0..{group.slice_count - 1}")
    if label is not None and not LABEL_PATTERN.match(label):
        problems.add(
            index,
            "labelName",
            "labelName must be 1-64 characters of letters, digits, '_' or '-', "
            "starting with a letter or digit",
        )
    name = _slice_name(index, label)
    if name in seen:
        problems.add(index, "sliceIndex", "slice appears twice in this call")
    seen.add(name)


async def _masks_in_range(
    session: AsyncSession, group_id: int, indexes: Sequence[int]
) -> dict[tuple[int, str], Row[Any]]:
    # A range scan on the group's index instead of a parameter per slice; plain rows, since
    # thousands of ORM objects in the identity map cost more than the query.
    rows = await session.execute(
        select(MASK).where(
            MASK.c.mask_group_id == group_id,
            MASK.c.slice_index.between(min(indexes), max(indexes)),
        )
    )
    return {_slice_name(row.slice_index, row.label_name): row for row in rows}


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
    _check_batch_size(settings, len(slices))
    ttl = settings.signed_url_default_ttl if ttl_seconds is None else ttl_seconds
    if not 1 <= ttl <= settings.signed_url_max_ttl:
        raise BadUserInput(
            f"ttlSeconds must be between 1 and {settings.signed_url_max_ttl}", field="ttlSeconds"
        )
    group = await _lock_own_group(session, actor, group_id)

    problems = _Problems()
    seen: set[tuple[int, str]] = set()
    md5_hexes: list[str] = []
    allowed = set(settings.allowed_content_types)
    for item in slices:
        _check_slice_identity(problems, seen, group, item.slice_index, item.label_name)
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
    problems.raise_if_any()

    indexes = [item.slice_index for item in slices]
    registered = await _masks_in_range(session, group_id, indexes)
    conflicts = _Problems()
    for item in slices:
        if _slice_name(item.slice_index, item.label_name) in registered:
            conflicts.add(item.slice_index, "sliceIndex", "slice is already registered")
    conflicts.raise_if_any(Conflict)

    # A fresh URL replaces what an earlier call declared for the same slice.
    previous = await session.execute(
        select(MaskUpload.id, MaskUpload.slice_index, MaskUpload.label_name).where(
            MaskUpload.mask_group_id == group_id,
            MaskUpload.slice_index.between(min(indexes), max(indexes)),
        )
    )
    replaced = [row.id for row in previous if _slice_name(row.slice_index, row.label_name) in seen]
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
        annotation_id=group.annotation_id,
        mask_group_id=group.id,
        slice_count=len(slices),
        byte_count=sum(item.file_size for item in slices),
        detail={"ttlSeconds": ttl},
    )
    return targets


async def complete_upload(
    session: AsyncSession,
    storage: Storage,
    settings: Settings,
    actor: Actor,
    *,
    group_id: int,
    slices: Sequence[CompletedSlice],
    now: datetime,
) -> tuple[MaskGroup, list[Row[Any]]]:
    require(actor.principal, Role.UPLOADER)
    _check_batch_size(settings, len(slices))
    group = await _lock_own_group(session, actor, group_id)

    problems = _Problems()
    seen: set[tuple[int, str]] = set()
    for item in slices:
        _check_slice_identity(problems, seen, group, item.slice_index, item.label_name)
        if item.sop_instance_uid is not None and (
            len(item.sop_instance_uid) > UID_MAX_LENGTH
            or not UID_PATTERN.match(item.sop_instance_uid)
        ):
            problems.add(item.slice_index, "sopInstanceUid", "sopInstanceUid must be a DICOM UID")
        for field, value in (("width", item.width), ("height", item.height)):
            if value is not None and not 1 <= value <= MAX_DIMENSION:
                problems.add(item.slice_index, field, f"{field} must be in 1..{MAX_DIMENSION}")
        if item.confidence is not None and not 0.0 <= item.confidence <= 1.0:
            problems.add(item.slice_index, "confidence", "confidence must be between 0 and 1")
    problems.raise_if_any()

    indexes = [item.slice_index for item in slices]
    registered = await _masks_in_range(session, group_id, indexes)
    uploads_result = await session.execute(
        select(MASK_UPLOAD).where(
            MASK_UPLOAD.c.mask_group_id == group_id,
            MASK_UPLOAD.c.slice_index.between(min(indexes), max(indexes)),
        )
    )
    uploads = {
        _slice_name(upload.slice_index, upload.label_name): upload for upload in uploads_result
    }

    keys: list[str] = []
    for item in slices:
        name = _slice_name(item.slice_index, item.label_name)
        known = registered.get(name) or uploads.get(name)
        if known is not None:
            keys.append(known.file_path)
    try:
        stored = await storage.stat_objects(keys) if keys else {}
    except StorageError as error:
        raise StorageUnavailable(f"storage could not be listed: {error}") from error

    missing: list[int] = []
    mismatched: list[int] = []
    result: list[Row[Any] | None] = []
    new_rows: list[dict[str, Any]] = []
    for item in slices:
        name = _slice_name(item.slice_index, item.label_name)
        mask = registered.get(name)
        if mask is not None:
            found = stored.get(mask.file_path)
            if found is None:
                missing.append(item.slice_index)
            elif found.size != mask.file_size or f"md5:{found.md5_hex}" != mask.checksum:
                mismatched.append(item.slice_index)
            result.append(mask)
            continue
        upload = uploads.get(name)
        found = stored.get(upload.file_path) if upload is not None else None
        if upload is None or found is None:
            missing.append(item.slice_index)
        elif found.size != upload.file_size or found.md5_hex != upload.content_md5:
            mismatched.append(item.slice_index)
        else:
            new_rows.append(
                {
                    "mask_group_id": group.id,
                    "slice_index": item.slice_index,
                    "sop_instance_uid": item.sop_instance_uid,
                    "label_name": item.label_name,
                    "file_path": upload.file_path,
                    "mime_type": upload.content_type,
                    "file_size": found.size,
                    "checksum": f"md5:{found.md5_hex}",
                    "width": item.width,
                    "height": item.height,
                    "confidence": item.confidence,
                    "created_at": now,
                }
            )
        result.append(None)

    if missing:
        raise UploadIncomplete(
            f"{len(missing)} slice(s) have no uploaded object in storage",
            slice_indexes=missing,
            missingSliceIndexes=missing,
            mismatchedSliceIndexes=mismatched,
        )
    if mismatched:
        raise ChecksumMismatch(
            f"{len(mismatched)} slice(s) differ in size or MD5 from what was declared",
            slice_indexes=mismatched,
            mismatchedSliceIndexes=mismatched,
        )

    if new_rows:
        inserted = await session.execute(insert(MASK).returning(*MASK.c), new_rows)
        by_name = {_slice_name(mask.slice_index, mask.label_name): mask for mask in inserted}
        upload_ids = [uploads[name].id for name in by_name]
        await session.execute(delete(MaskUpload).where(MaskUpload.id.in_(upload_ids)))
        uploaded = await session.scalar(
            select(func.count(func.distinct(Mask.slice_index))).where(
                Mask.mask_group_id == group.id
            )
        )
        group.uploaded_slice_count = uploaded or 0
        group.total_bytes = group.total_bytes + sum(row["file_size"] for row in new_rows)
        group.status = (
            MaskGroupStatus.COMPLETE
            if group.uploaded_slice_count >= group.slice_count
            else MaskGroupStatus.UPLOADING
        )
        await session.flush()
        result = [
            mask or by_name[_slice_name(item.slice_index, item.label_name)]
            for mask, item in zip(result, slices, strict=True)
        ]
    await record(
        session,
        actor,
        "upload.complete",
        annotation_id=group.annotation_id,
        mask_group_id=group.id,
        slice_count=len(new_rows),
        byte_count=sum(row["file_size"] for row in new_rows),
        detail={"alreadyRegistered": len(slices) - len(new_rows), "status": group.status.value},
    )
    return group, [mask for mask in result if mask is not None]


async def delete_mask_group(
    session: AsyncSession, actor: Actor, *, group_id: int, now: datetime
) -> GroupDeletion:
    """Drop the group's rows and record its storage prefix for removal, in one transaction,
    so no object is ever left without a record that it must go."""
    require(actor.principal, Role.UPLOADER)
    group = await _lock_own_group(session, actor, group_id, field="id")
    mask_count = await session.scalar(
        select(func.count()).select_from(Mask).where(Mask.mask_group_id == group_id)
    )
    prefix = group_prefix(group.annotation_id, group.id)
    deletion_id = await session.scalar(
        insert(StorageDeletion)
        .values(
            prefix=prefix,
            mask_group_id=group.id,
            not_before=now,
            attempts=0,
            created_at=now,
        )
        .returning(StorageDeletion.id)
    )
    assert deletion_id is not None
    # Masks and pending uploads go with the group (ON DELETE CASCADE).
    await session.execute(delete(MaskGroup).where(MaskGroup.id == group_id))
    await record(
        session,
        actor,
        "mask_group.delete",
        annotation_id=group.annotation_id,
        mask_group_id=group.id,
        slice_count=mask_count or 0,
        byte_count=group.total_bytes,
    )
    return GroupDeletion(
        mask_group_id=group.id,
        prefix=prefix,
        deleted_mask_count=mask_count or 0,
        storage_deletion_id=deletion_id,
        upload_expires_at=group.upload_expires_at,
    )


async def purge_storage_deletion(
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    deletion_id: int,
    *,
    prefix: str,
    upload_expires_at: datetime | None,
) -> tuple[int, bool]:
    """Remove the objects of one recorded deletion. Returns (objects removed, failed).

    The record stays while storage fails, and also while an issued PUT URL could still write
    under the prefix: a later sweep removes what such a late upload leaves."""
    try:
        removed = await storage.delete_prefix(prefix)
    except StorageError as error:
        logger.warning("storage cleanup of %s failed, kept for retry: %s", prefix, error)
        async with transaction(sessionmaker) as session:
            await session.execute(
                update(StorageDeletion)
                .where(StorageDeletion.id == deletion_id)
                .values(attempts=StorageDeletion.attempts + 1, last_error=str(error)[:1000])
            )
        return 0, True
    now = utcnow()
    async with transaction(sessionmaker) as session:
        if upload_expires_at is not None and upload_expires_at > now:
            await session.execute(
                update(StorageDeletion)
                .where(StorageDeletion.id == deletion_id)
                .values(not_before=upload_expires_at, attempts=StorageDeletion.attempts + 1)
            )
            return removed, False
        await session.execute(delete(StorageDeletion).where(StorageDeletion.id == deletion_id))
    return removed, False
