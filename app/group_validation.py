"""Validation of a mask group: completeness and integrity of what storage holds.

Every slice 0..sliceCount-1 must have a mask; each object must exist with the recorded size
and MD5 (one listing per 1000 keys, then the full stream hashed while it is read); each PNG
must parse, have the recorded width/height, the group's common dimensions, and a mask pixel
mode (1-bit, 8-bit grey, or a palette label map).

Storage is read with no database transaction open: the group and its masks are read in one
short session, the objects streamed with bounded concurrency, the report written in a second
short transaction, which also answers any pending request of the validation job
(app/validation_job.py) and publishes a VALIDATED event.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from PIL import Image
from sqlalchemy import Row, Table, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit import Actor, record
from app.db import transaction
from app.errors import NotFound, StorageUnavailable
from app.events import EventBus, EventKind, MaskGroupEvent, group_state
from app.models import (
    Mask,
    MaskGroup,
    MaskGroupValidation,
    ValidationRequest,
    ValidationStatus,
    utcnow,
)
from app.principals import Role, require, require_owner
from app.storage import Storage, StorageError

GROUP = cast(Table, MaskGroup.__table__)
MASK = cast(Table, Mask.__table__)
VALIDATION = cast(Table, MaskGroupValidation.__table__)
READ_CONCURRENCY = 8
# Enough for the PNG signature, IHDR and a 256-entry palette, so Pillow reads size and mode
# without the image data.
HEADER_BYTES = 4096
ALLOWED_MODES = {"1", "L", "P"}
MAX_STORED_PROBLEMS = 1000


@dataclass(frozen=True, slots=True)
class ValidationProblem:
    slice_index: int | None
    code: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"sliceIndex": self.slice_index, "code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class ValidationReport:
    mask_group_id: int
    status: ValidationStatus
    checked_at: datetime
    problems: list[ValidationProblem]
    problem_count: int

    @classmethod
    def from_row(cls, row: Any) -> ValidationReport:
        return cls(
            mask_group_id=row.mask_group_id,
            status=ValidationStatus(row.status),
            checked_at=row.checked_at,
            problems=[
                ValidationProblem(item.get("sliceIndex"), item["code"], item["message"])
                for item in row.problems or []
            ],
            problem_count=row.problem_count,
        )


@dataclass(frozen=True, slots=True)
class _Decoded:
    width: int
    height: int


def _checksum_problem(mask: Row[Any], md5_hex: str) -> ValidationProblem:
    recorded = mask.checksum.removeprefix("md5:")
    return ValidationProblem(
        mask.slice_index,
        "CHECKSUM_MISMATCH",
        f"{mask.file_path} has MD5 {md5_hex}, not the recorded {recorded}",
    )


async def _read_object(
    storage: Storage, mask: Row[Any], problems: list[ValidationProblem]
) -> _Decoded | None:
    index = mask.slice_index
    stream = await storage.open(mask.file_path)
    if stream is None:
        problems.append(ValidationProblem(index, "MISSING_OBJECT", f"{mask.file_path} is gone"))
        return None
    md5 = hashlib.md5(usedforsecurity=False)
    head = bytearray()
    size = 0
    async for chunk in stream.chunks:
        md5.update(chunk)
        size += len(chunk)
        if len(head) < HEADER_BYTES:
            head += chunk[: HEADER_BYTES - len(head)]
    if size != mask.file_size:
        problems.append(
            ValidationProblem(
                index,
                "SIZE_MISMATCH",
                f"{mask.file_path} holds {size} bytes, {mask.file_size} recorded",
            )
        )
    elif f"md5:{md5.hexdigest()}" != mask.checksum:
        # Storage listed the recorded MD5 but holds other bytes (a stale local sidecar, or a
        # listing that gives no MD5 for multipart objects): the stream is the truth.
        problems.append(_checksum_problem(mask, md5.hexdigest()))
    if mask.mime_type != "image/png":
        return None
    try:
        with Image.open(io.BytesIO(bytes(head)), formats=["PNG"]) as image:
            width, height = image.size
            mode = image.mode
    except (OSError, SyntaxError, ValueError):
        problems.append(
            ValidationProblem(
                index, "NOT_A_PNG", f"{mask.file_path} is declared image/png but is not a PNG"
            )
        )
        return None
    if mode not in ALLOWED_MODES:
        problems.append(
            ValidationProblem(
                index,
                "BAD_PIXEL_MODE",
                f"{mask.file_path} has pixel mode {mode}; masks are 1-bit, 8-bit grey (L) or "
                "palette (P)",
            )
        )
    if (mask.width is not None and mask.width != width) or (
        mask.height is not None and mask.height != height
    ):
        problems.append(
            ValidationProblem(
                index,
                "DIMENSION_MISMATCH",
                f"{mask.file_path} is {width}x{height}, {mask.width}x{mask.height} recorded",
            )
        )
    return _Decoded(width, height)


async def check_objects(
    storage: Storage,
    slice_count: int,
    masks: Sequence[Row[Any]],
    concurrency: int = READ_CONCURRENCY,
) -> list[ValidationProblem]:
    """Every problem of the group's masks in storage, ordered by slice."""
    problems: list[ValidationProblem] = []
    present = {mask.slice_index for mask in masks}
    problems.extend(
        ValidationProblem(index, "MISSING_SLICE", f"slice {index} has no mask")
        for index in range(slice_count)
        if index not in present
    )
    try:
        listed = await storage.stat_objects([mask.file_path for mask in masks]) if masks else {}
    except StorageError as error:
        raise StorageUnavailable(f"storage could not be listed: {error}") from error
    readable = []
    for mask in masks:
        found = listed.get(mask.file_path)
        if found is None:
            problems.append(
                ValidationProblem(mask.slice_index, "MISSING_OBJECT", f"{mask.file_path} is gone")
            )
        elif found.size != mask.file_size:
            problems.append(
                ValidationProblem(
                    mask.slice_index,
                    "SIZE_MISMATCH",
                    f"{mask.file_path} holds {found.size} bytes, {mask.file_size} recorded",
                )
            )
        elif found.md5_hex is not None and f"md5:{found.md5_hex}" != mask.checksum:
            problems.append(_checksum_problem(mask, found.md5_hex))
        else:
            readable.append(mask)

    decoded: dict[int, tuple[Row[Any], _Decoded]] = {}
    pending = iter(readable)

    # A fixed pool of readers over one iterator: a task per object would cost memory in
    # proportion to the group.
    async def reader() -> None:
        for mask in pending:
            result = await _read_object(storage, mask, problems)
            if result is not None:
                decoded[mask.id] = (mask, result)

    try:
        await asyncio.gather(*(reader() for _ in range(concurrency)))
    except StorageError as error:
        raise StorageUnavailable(f"storage could not be read: {error}") from error

    sizes = Counter((item.width, item.height) for _, item in decoded.values())
    if len(sizes) > 1:
        (common, _), *_ = sizes.most_common(1)
        for mask, item in decoded.values():
            if (item.width, item.height) != common:
                problems.append(
                    ValidationProblem(
                        mask.slice_index,
                        "DIMENSION_MISMATCH",
                        f"{mask.file_path} is {item.width}x{item.height}, the group's slices are "
                        f"{common[0]}x{common[1]}",
                    )
                )
    problems.sort(key=lambda problem: (problem.slice_index or -1, problem.code))
    return problems


async def _load_group(
    sessionmaker: async_sessionmaker[AsyncSession], group_id: int
) -> tuple[Any, list[Row[Any]]]:
    async with sessionmaker() as session:
        group = (
            await session.execute(
                select(
                    GROUP.c.id, GROUP.c.annotation_id, GROUP.c.slice_count, GROUP.c.created_by
                ).where(GROUP.c.id == group_id)
            )
        ).first()
        if group is None:
            raise NotFound(f"mask group {group_id} does not exist", field="id")
        masks = list(
            await session.execute(
                select(MASK).where(MASK.c.mask_group_id == group_id).order_by(MASK.c.slice_index)
            )
        )
    return group, masks


async def validate_group(
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    group_id: int,
    *,
    events: EventBus,
    actor: Actor | None = None,
) -> ValidationReport:
    """Check one group now, store the report and return it. `actor`, when given, must own the
    group (or be an ADMIN); the validation job passes none."""
    if actor is not None:
        require(actor.principal, Role.UPLOADER)
    group, masks = await _load_group(sessionmaker, group_id)
    if actor is not None:
        require_owner(actor.principal, group.created_by, f"mask group {group_id}")
    # The state checked is the one read at this moment (masks registered later are not).
    checked_at = utcnow()
    problems = await check_objects(storage, group.slice_count, masks)
    status = ValidationStatus.INVALID if problems else ValidationStatus.VALID
    stored = [problem.as_json() for problem in problems[:MAX_STORED_PROBLEMS]]
    async with transaction(sessionmaker) as session:
        # The group may have been deleted while storage was read: then there is nothing to keep.
        state = await group_state(session, group_id)
        if state is None:
            raise NotFound(f"mask group {group_id} was deleted during validation", field="id")
        await session.execute(
            insert(MaskGroupValidation).values(
                mask_group_id=group_id,
                status=status,
                checked_at=checked_at,
                problem_count=len(problems),
                problems=stored,
                checked_by=actor.principal.user if actor is not None else None,
                mask_count=len(masks),
            )
        )
        await session.execute(
            delete(ValidationRequest).where(ValidationRequest.mask_group_id == group_id)
        )
        await events.publish(session, MaskGroupEvent.of(EventKind.VALIDATED, state))
        if actor is not None:
            await record(
                session,
                actor,
                "mask_group.validate",
                annotation_id=group.annotation_id,
                mask_group_id=group_id,
                slice_count=len(masks),
                detail={"status": status.value, "problemCount": len(problems)},
            )
    return ValidationReport(
        group_id,
        status,
        checked_at,
        [ValidationProblem(p["sliceIndex"], p["code"], p["message"]) for p in stored],
        len(problems),
    )


async def latest_reports(
    session: AsyncSession, group_ids: Sequence[int]
) -> dict[int, ValidationReport]:
    latest = (
        select(func.max(VALIDATION.c.id))
        .where(VALIDATION.c.mask_group_id.in_(group_ids))
        .group_by(VALIDATION.c.mask_group_id)
    )
    rows = await session.execute(select(VALIDATION).where(VALIDATION.c.id.in_(latest)))
    return {row.mask_group_id: ValidationReport.from_row(row) for row in rows}
