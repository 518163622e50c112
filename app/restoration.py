"""Bringing back a group deleted within DELETED_GROUP_RETENTION, and purging its rows once the
window has closed (the storage sweeper, before it removes the objects).

Both lock the group's deletion record before the group row, in that order, so a restore and
a sweeper claiming the same record never deadlock: whichever commits first wins, and the
other finds nothing to do (restore answers NOT_FOUND once the rows are purged)."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import Actor, record
from app.errors import Conflict, NotFound
from app.models import INCLUDE_DELETED, MaskGroup, StorageDeletion
from app.principals import Role, require
from app.storage import group_prefix


async def restore_mask_group(session: AsyncSession, actor: Actor, *, group_id: int) -> MaskGroup:
    """Undo a retained delete: the same rows, the same objects (never purged while the
    deletion record exists), visible again at once."""
    require(actor.principal, Role.ADMIN)
    records = (
        await session.scalars(
            select(StorageDeletion)
            .where(StorageDeletion.mask_group_id == group_id)
            .order_by(StorageDeletion.id)
            .with_for_update()
        )
    ).all()
    group = await session.scalar(
        select(MaskGroup)
        .where(MaskGroup.id == group_id)
        .with_for_update()
        .execution_options(**INCLUDE_DELETED)
    )
    if group is None:
        raise NotFound(f"mask group {group_id} does not exist or was purged", field="id")
    if group.deleted_at is None:
        raise Conflict(f"mask group {group_id} is not deleted", field="id")
    prefix = group_prefix(group.annotation_id, group.id)
    await session.execute(
        delete(StorageDeletion).where(
            StorageDeletion.id.in_([row.id for row in records if row.prefix == prefix])
        )
    )
    deleted_at, deleted_by = group.deleted_at, group.deleted_by
    group.deleted_at = group.deleted_by = None
    await record(
        session,
        actor,
        "mask_group.restore",
        group=group,
        slice_count=group.uploaded_slice_count,
        byte_count=group.total_bytes,
        detail={"deletedAt": deleted_at.isoformat(), "deletedBy": deleted_by},
    )
    return group


async def purge_deleted_rows(session: AsyncSession, group_ids: Collection[int]) -> None:
    """Drop the rows of retained groups whose deletion record the sweeper has just claimed
    (masks and pending uploads go with them: ON DELETE CASCADE); groups deleted at once are
    gone already."""
    if group_ids:
        await session.execute(
            delete(MaskGroup)
            .where(MaskGroup.id.in_(group_ids), MaskGroup.deleted_at.is_not(None))
            .execution_options(**INCLUDE_DELETED)
        )
