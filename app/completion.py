"""Completing uploads: verify each object in storage by listing, then register the masks.

Storage is asked with no database session open (a frozen storage must not hold the group lock
or a pooled connection): the declarations are read in a short read-only session, storage is
listed, then one transaction locks the group, checks that nothing it relies on changed since
the read, and writes. When something did change (a concurrent batch, a new declaration), the
verification runs again, a few times at most."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit import Actor, record
from app.config import Settings
from app.db import transaction
from app.errors import ChecksumMismatch, Conflict, StorageUnavailable, UploadIncomplete
from app.logging_setup import add_server_timing
from app.models import Mask, MaskGroup, MaskGroupStatus, MaskUpload, StorageDeletion
from app.slices import MASK, SliceName, check_slice_identity, lock_batch, rows_in_range, slice_name
from app.storage import Storage, StorageError, StoredObject
from app.upload_urls import MASK_UPLOAD
from app.validation import MAX_DIMENSION, Problems, is_uid

# Verify-then-lock rounds before a batch that keeps changing underneath is refused.
VERIFY_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class CompletedSlice:
    slice_index: int
    label_name: str | None
    sop_instance_uid: str | None
    width: int | None
    height: int | None
    confidence: float | None = None


def _check_slices(group: MaskGroup, slices: Sequence[CompletedSlice]) -> None:
    problems = Problems()
    seen: set[SliceName] = set()
    for item in slices:
        check_slice_identity(problems, seen, group, item.slice_index, item.label_name)
        if item.sop_instance_uid is not None and not is_uid(item.sop_instance_uid):
            problems.add(item.slice_index, "sopInstanceUid", "sopInstanceUid must be a DICOM UID")
        for field, value in (("width", item.width), ("height", item.height)):
            if value is not None and not 1 <= value <= MAX_DIMENSION:
                problems.add(item.slice_index, field, f"{field} must be in 1..{MAX_DIMENSION}")
        if item.confidence is not None and not 0.0 <= item.confidence <= 1.0:
            problems.add(item.slice_index, "confidence", "confidence must be between 0 and 1")
    problems.raise_if_any()


@dataclass(frozen=True, slots=True)
class Verification:
    """The batch's rows as read before storage was asked, and what storage answered."""

    registered: dict[SliceName, Row[Any]]
    uploads: dict[SliceName, Row[Any]]
    listed: frozenset[str]
    stored: dict[str, StoredObject]


async def complete_mask_upload(
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    settings: Settings,
    actor: Actor,
    *,
    group_id: int,
    slices: Sequence[CompletedSlice],
    now: datetime,
) -> tuple[MaskGroup, list[Row[Any]]]:
    for _attempt in range(VERIFY_ATTEMPTS):
        async with sessionmaker() as session:
            _, registered, uploads = await _read_batch(
                session, settings, actor, group_id, slices, lock=False
            )
        verification = await _verify(storage, slices, registered, uploads)
        async with transaction(sessionmaker) as session:
            done = await _register(session, settings, actor, group_id, slices, verification, now)
        if done is not None:
            return done
    raise Conflict(
        "the slices kept changing while they were being verified (concurrent uploads); retry",
        field="slices",
    )


async def _read_batch(
    session: AsyncSession,
    settings: Settings,
    actor: Actor,
    group_id: int,
    slices: Sequence[CompletedSlice],
    *,
    lock: bool,
) -> tuple[MaskGroup, dict[SliceName, Row[Any]], dict[SliceName, Row[Any]]]:
    group = await lock_batch(session, settings, actor, group_id, len(slices), lock=lock)
    _check_slices(group, slices)
    indexes = [item.slice_index for item in slices]
    registered = await rows_in_range(session, MASK, group_id, indexes)
    uploads = await rows_in_range(session, MASK_UPLOAD, group_id, indexes)
    return group, registered, uploads


async def _verify(
    storage: Storage,
    slices: Sequence[CompletedSlice],
    registered: dict[SliceName, Row[Any]],
    uploads: dict[SliceName, Row[Any]],
) -> Verification:
    keys: list[str] = []
    for item in slices:
        name = slice_name(item.slice_index, item.label_name)
        known = registered.get(name) or uploads.get(name)
        if known is not None:
            keys.append(known.file_path)
    started = time.perf_counter()
    try:
        stored = await storage.stat_objects(keys) if keys else {}
    except StorageError as error:
        raise StorageUnavailable(f"storage could not be listed: {error}") from error
    finally:
        add_server_timing("storage", time.perf_counter() - started)
    return Verification(registered, uploads, frozenset(keys), stored)


def _unchanged(
    verification: Verification,
    slices: Sequence[CompletedSlice],
    registered: dict[SliceName, Row[Any]],
    uploads: dict[SliceName, Row[Any]],
) -> bool:
    """Whether the storage answer still speaks for every slice: each is either registered
    with an object that was listed, or has the very declaration that was read."""
    for item in slices:
        name = slice_name(item.slice_index, item.label_name)
        mask = registered.get(name)
        if mask is not None:
            # Registered since the read: a listing older than its upload must not say missing.
            fresh = name not in verification.registered
            if mask.file_path not in verification.listed or (
                fresh and mask.file_path not in verification.stored
            ):
                return False
            continue
        before, after = verification.uploads.get(name), uploads.get(name)
        if (before.id if before else None) != (after.id if after else None):
            return False
    return True


async def _fenced_keys(session: AsyncSession, group_id: int, keys: Sequence[str]) -> set[str]:
    """Keys the sweeper is removing as upload debris right now (see app.sweeper)."""
    if not keys:
        return set()
    rows = await session.scalars(
        select(StorageDeletion.prefix).where(
            StorageDeletion.mask_group_id == group_id,
            StorageDeletion.prefix.between(min(keys), max(keys)),
        )
    )
    return set(rows) & set(keys)


async def _register(
    session: AsyncSession,
    settings: Settings,
    actor: Actor,
    group_id: int,
    slices: Sequence[CompletedSlice],
    verification: Verification,
    now: datetime,
) -> tuple[MaskGroup, list[Row[Any]]] | None:
    """Under the group lock: None if the batch changed since it was verified."""
    group, registered, uploads = await _read_batch(
        session, settings, actor, group_id, slices, lock=True
    )
    if not _unchanged(verification, slices, registered, uploads):
        return None
    fenced = await _fenced_keys(session, group_id, [row.file_path for row in uploads.values()])
    stored = {key: found for key, found in verification.stored.items() if key not in fenced}

    missing: list[int] = []
    mismatched: list[int] = []
    result: list[Row[Any] | None] = []
    new_rows: list[dict[str, Any]] = []
    for item in slices:
        name = slice_name(item.slice_index, item.label_name)
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
        by_name = {slice_name(mask.slice_index, mask.label_name): mask for mask in inserted}
        upload_ids = [uploads[name].id for name in by_name]
        await session.execute(delete(MaskUpload).where(MaskUpload.id.in_(upload_ids)))
        uploaded = await session.scalar(
            select(func.count(func.distinct(Mask.slice_index))).where(
                Mask.mask_group_id == group.id
            )
        )
        group.uploaded_slice_count = uploaded or 0
        group.total_bytes = group.total_bytes + sum(row["file_size"] for row in new_rows)
        group.object_count = group.object_count + len(new_rows)
        group.status = (
            MaskGroupStatus.COMPLETE
            if group.uploaded_slice_count >= group.slice_count
            else MaskGroupStatus.UPLOADING
        )
        await session.flush()
        result = [
            mask or by_name[slice_name(item.slice_index, item.label_name)]
            for mask, item in zip(result, slices, strict=True)
        ]
    await record(
        session,
        actor,
        "upload.complete",
        group=group,
        slice_count=len(new_rows),
        byte_count=sum(row["file_size"] for row in new_rows),
        detail={"alreadyRegistered": len(slices) - len(new_rows), "status": group.status.value},
    )
    return group, [mask for mask in result if mask is not None]
