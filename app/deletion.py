"""Deleting a mask group without orphans: rows go and the storage prefix is recorded in one
transaction; the objects are purged after it, and the record goes only once storage is clean.

The caller owns every transaction: `delete_mask_group` and `settle_purge` run inside one each,
`purge` touches storage only, so no storage call happens while a transaction holds locks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import Actor, record
from app.models import Mask, MaskGroup, StorageDeletion
from app.principals import Role, require
from app.slices import lock_own_group
from app.storage import Storage, StorageError, group_prefix

logger = logging.getLogger(__name__)

RETRY_DELAY_MAX_SECONDS = 6 * 3600


@dataclass(frozen=True, slots=True)
class GroupDeletion:
    mask_group_id: int
    prefix: str
    deleted_mask_count: int
    storage_deletion_id: int
    upload_expires_at: datetime | None
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Purge:
    removed: int
    error: str | None
    removed_bytes: int = 0

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
            urls_expire_at=group.upload_expires_at,
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
    removed = removed_bytes = 0
    try:
        # Listed page by page so the sweeper's report can say how many bytes went.
        async for page in storage.list_objects(deletion.prefix):
            removed += await storage.delete_objects([item.key for item in page])
            removed_bytes += sum(item.size for item in page)
    except StorageError as error:
        logger.warning("storage cleanup of %s failed, kept for retry: %s", deletion.prefix, error)
        return Purge(removed=removed, error=str(error), removed_bytes=removed_bytes)
    return Purge(removed=removed, error=None, removed_bytes=removed_bytes)


def retry_delay(attempts: int) -> timedelta:
    """Exponential backoff after `attempts` failed purges: 1 min, 2, 4, ... at most 6 hours."""
    return timedelta(seconds=min(60 * 2 ** min(attempts - 1, 20), RETRY_DELAY_MAX_SECONDS))


async def settle_purge(
    session: AsyncSession, deletion: GroupDeletion, outcome: Purge, *, now: datetime
) -> bool:
    """Drop the deletion record once storage is clean and no issued PUT URL can still write
    under the prefix; otherwise keep it, due again after a backoff or when that URL expires.
    Returns whether anything is still to be swept."""
    row = StorageDeletion.id == deletion.storage_deletion_id
    if outcome.error is not None:
        attempts = deletion.attempts + 1
        await session.execute(
            update(StorageDeletion)
            .where(row)
            .values(
                attempts=attempts,
                last_error=outcome.error[:1000],
                not_before=now + retry_delay(attempts),
            )
        )
        return True
    if deletion.upload_expires_at is not None and deletion.upload_expires_at > now:
        await session.execute(
            update(StorageDeletion)
            .where(row)
            .values(not_before=deletion.upload_expires_at, last_error=None)
        )
        return True
    await session.execute(delete(StorageDeletion).where(row))
    return False
