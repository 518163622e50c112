"""Deleting a mask group without orphans: rows go and the storage prefix is recorded in one
transaction; the objects are purged after it, and the record goes only once storage is clean.

The caller owns every transaction: `delete_mask_group` and `settle_purge` run inside one each,
`purge` touches storage only, so no storage call happens while a transaction holds locks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import Actor, record
from app.models import Mask, MaskGroup, StorageDeletion
from app.principals import Role, require
from app.slices import lock_own_group
from app.storage import Storage, StorageError, group_prefix

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupDeletion:
    mask_group_id: int
    prefix: str
    deleted_mask_count: int
    storage_deletion_id: int
    upload_expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Purge:
    removed: int
    error: str | None

    @property
    def failed(self) -> bool:
        return self.error is not None


async def delete_mask_group(
    session: AsyncSession, actor: Actor, *, group_id: int, now: datetime
) -> GroupDeletion:
    """Drop the group's rows and record its storage prefix for removal, in one transaction,
    so no object is ever left without a record that it must go."""
    require(actor.principal, Role.UPLOADER)
    group = await lock_own_group(session, actor, group_id, field="id")
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
        group=group,
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


async def purge(storage: Storage, deletion: GroupDeletion) -> Purge:
    """Remove the objects under the deletion's prefix; a storage failure is reported, not
    raised: the record stays for a later sweep."""
    try:
        return Purge(removed=await storage.delete_prefix(deletion.prefix), error=None)
    except StorageError as error:
        logger.warning("storage cleanup of %s failed, kept for retry: %s", deletion.prefix, error)
        return Purge(removed=0, error=str(error))


async def settle_purge(
    session: AsyncSession, deletion: GroupDeletion, outcome: Purge, *, now: datetime
) -> None:
    """Drop the deletion record once storage is clean and no issued PUT URL can still write
    under the prefix; otherwise keep it, due again when that URL expires."""
    row = StorageDeletion.id == deletion.storage_deletion_id
    if outcome.error is not None:
        await session.execute(
            update(StorageDeletion)
            .where(row)
            .values(attempts=StorageDeletion.attempts + 1, last_error=outcome.error[:1000])
        )
    elif deletion.upload_expires_at is not None and deletion.upload_expires_at > now:
        await session.execute(
            update(StorageDeletion)
            .where(row)
            .values(not_before=deletion.upload_expires_at, attempts=StorageDeletion.attempts + 1)
        )
    else:
        await session.execute(delete(StorageDeletion).where(row))
