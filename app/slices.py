"""The slices of one mask group: what every batch on a group shares (the group lock, the batch
size, the slice identity rules, the masks already registered) and finding one slice's mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Row, Table, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import Actor
from app.config import Settings
from app.errors import BadUserInput, NotFound
from app.models import Mask, MaskGroup
from app.principals import Role, require, require_owner
from app.storage import LABEL_PATTERN
from app.validation import Problems

MASK = cast(Table, Mask.__table__)

SliceName = tuple[int, str]


def slice_name(slice_index: int, label_name: str | None) -> SliceName:
    return (slice_index, label_name or "")


async def lock_own_group(
    session: AsyncSession, actor: Actor, group_id: int, field: str = "groupId", lock: bool = True
) -> MaskGroup:
    # FOR UPDATE serialises batches of one group on PostgreSQL (SQLite: BEGIN IMMEDIATE).
    statement = select(MaskGroup).where(MaskGroup.id == group_id)
    group = await session.scalar(statement.with_for_update() if lock else statement)
    if group is None:
        raise NotFound(f"mask group {group_id} does not exist", field=field)
    require_owner(actor.principal, group.created_by, f"mask group {group_id}")
    return group


async def lock_batch(
    session: AsyncSession,
    settings: Settings,
    actor: Actor,
    group_id: int,
    count: int,
    lock: bool = True,
) -> MaskGroup:
    """The checks every batch of slices on a group starts with, in the order clients see;
    `lock=False` for a read before storage is asked (completion), which locks later."""
    require(actor.principal, Role.UPLOADER)
    check_batch_size(settings, count)
    return await lock_own_group(session, actor, group_id, lock=lock)


def check_batch_size(settings: Settings, count: int) -> None:
    if count == 0:
        raise BadUserInput("slices must not be empty", field="slices")
    if count > settings.max_slices_per_call:
        raise BadUserInput(
            f"at most {settings.max_slices_per_call} slices per call, got {count}", field="slices"
        )


def check_slice_identity(
    problems: Problems, seen: set[SliceName], group: MaskGroup, index: int, label: str | None
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
    name = slice_name(index, label)
    if name in seen:
        problems.add(index, "sliceIndex", "slice appears twice in this call")
    seen.add(name)


async def rows_in_range(
    session: AsyncSession, table: Table, group_id: int, indexes: Sequence[int]
) -> dict[SliceName, Row[Any]]:
    """Rows of `table` (masks or pending uploads) for the batch's slice range, by slice name.

    A range scan on the group's index instead of a parameter per slice; plain rows, since
    thousands of ORM objects in the identity map cost more than the query."""
    rows = await session.execute(
        select(table).where(
            table.c.mask_group_id == group_id,
            table.c.slice_index.between(min(indexes), max(indexes)),
        )
    )
    return {slice_name(row.slice_index, row.label_name): row for row in rows}


async def find_mask(
    session: AsyncSession, group_id: int, slice_index: int, label_name: str | None
) -> Row[str, str, str] | None:
    """Where one slice's mask is stored (file_path, mime_type, checksum), for viewing it."""
    statement = select(Mask.file_path, Mask.mime_type, Mask.checksum).where(
        Mask.mask_group_id == group_id,
        Mask.slice_index == slice_index,
        func.coalesce(Mask.label_name, "") == (label_name or ""),
    )
    return (await session.execute(statement)).first()
