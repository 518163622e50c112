"""The storage sweeper: what deleted groups and abandoned uploads leave in storage goes.

Two passes, both safe with several sweepers at once (replicas, the `cleanup` command):

1. **Deletion records** (`storage_deletion`) that are due: claimed with `jobs.claim_due`,
   purged (`deletion.purge`) after that transaction, settled (`deletion.settle_purge`) in a
   second one. A failure backs off exponentially; a purge that ran while a PUT URL issued
   before the delete could still write is repeated once that URL has expired.
2. **Upload debris**: objects under `mask/` that no registered mask points to, with no
   upload URL still valid for their key, and older than the grace period
   (`CLEANUP_GRACE_SECONDS`, at least twice the longest URL TTL). Storage is listed page by
   page (one call per 1000 keys) and each page compared with the database in bulk. Before
   deleting, one transaction locks the groups, checks again and records each key as a
   `storage_deletion` row of its own (a fence): `completeMaskUpload` treats a fenced key as
   missing. After the delete, a second transaction, under the same locks, drops the fences
   and the keys' upload declarations, so a completion that listed storage before the delete
   finds its declaration changed and verifies again. A failed delete drops them too; the
   objects are found again by the next sweep. Groups whose deletion is pending are left to
   pass 1.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import transaction
from app.deletion import GroupDeletion, Purge, purge, settle_purge
from app.jobs import JobContext, acquire_lease, claim_due, release_lease
from app.metrics import count_sweep
from app.models import Mask, MaskGroup, MaskUpload, StorageDeletion, utcnow
from app.storage import KEY_ROOT, ListedObject, StorageError

logger = logging.getLogger(__name__)

CLAIM_BATCH = 100
DEBRIS_LEASE = "storage-cleanup:debris"
_GROUP_OF_KEY = re.compile(rf"{KEY_ROOT}/(\d+)/(\d+)/")
# Records of deleted groups name a prefix; the debris pass's fences name one key each.
_IS_GROUP_PREFIX = StorageDeletion.prefix.like("%/")


@dataclass
class SweepReport:
    dry_run: bool
    deletions_processed: int = 0
    deletions_finished: int = 0
    # Storage is clean, but an upload URL issued before the delete is still valid.
    deletions_waiting_for_url_expiry: int = 0
    deletions_failed: int = 0
    deleted_objects: int = 0
    deleted_bytes: int = 0
    debris_objects: int = 0
    debris_bytes: int = 0
    # Another sweeper was sweeping debris at the same time (the debris pass has a lease).
    debris_skipped: bool = False
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"{self.deletions_processed} deletion record(s) processed "
            f"({self.deletions_finished} finished, {self.deletions_waiting_for_url_expiry} "
            f"waiting for URL expiry, {self.deletions_failed} failed); {verb} "
            f"{self.deleted_objects} object(s) ({self.deleted_bytes} bytes) of deleted groups "
            f"and {self.debris_objects} debris object(s) ({self.debris_bytes} bytes)"
        )


def _lease(context: JobContext) -> timedelta:
    # Longer than one storage call may take: a claimed row is not taken by another sweeper
    # while its purge can still be running.
    return timedelta(seconds=max(300.0, 4 * context.settings.storage_call_deadline))


async def sweep(
    context: JobContext, *, dry_run: bool = False, now: datetime | None = None
) -> SweepReport:
    """One sweep; `now` is for tests that look at a later moment."""
    now = now or utcnow()
    report = SweepReport(dry_run=dry_run)
    if dry_run:
        await _preview_deletions(context, report, now)
    else:
        await _sweep_deletions(context, report, now)
    await _sweep_debris_once(context, report, now)
    logger.info("storage sweep: %s", report.summary())
    if not dry_run:
        count_sweep(
            (report.deleted_objects, report.deleted_bytes),
            (report.debris_objects, report.debris_bytes),
            len(report.errors),
        )
    return report


async def _sweep_debris_once(context: JobContext, report: SweepReport, now: datetime) -> None:
    """The debris pass under a lease of its own: two sweepers listing at once would each
    take the other's just-removed keys for debris again."""
    if not report.dry_run and not await acquire_lease(
        context.sessionmaker,
        DEBRIS_LEASE,
        context.owner,
        now=utcnow(),
        lease=_lease(context),
        force=True,
    ):
        report.debris_skipped = True
        return
    error: str | None = None
    try:
        await _sweep_debris(context, report, now)
    except StorageError as exc:
        error = f"listing storage: {exc}"
        report.errors.append(error)
    finally:
        if not report.dry_run:
            await release_lease(context.sessionmaker, DEBRIS_LEASE, context.owner, error)


async def sweep_job(context: JobContext) -> SweepReport:
    """The periodic job (`app.main.JOBS`)."""
    return await sweep(context)


def _as_deletion(row: StorageDeletion) -> GroupDeletion:
    return GroupDeletion(
        mask_group_id=row.mask_group_id or 0,
        prefix=row.prefix,
        deleted_mask_count=0,
        storage_deletion_id=row.id,
        upload_expires_at=row.urls_expire_at,
        attempts=row.attempts,
    )


async def _sweep_deletions(context: JobContext, report: SweepReport, now: datetime) -> None:
    while True:
        async with transaction(context.sessionmaker) as session:
            rows = await claim_due(
                session,
                StorageDeletion,
                StorageDeletion.not_before,
                now=now,
                lease=_lease(context),
                limit=CLAIM_BATCH,
                where=_IS_GROUP_PREFIX,
            )
            claimed = [_as_deletion(row) for row in rows]
        if not claimed:
            return
        for deletion in claimed:
            outcome = await purge(context.storage, deletion)
            async with transaction(context.sessionmaker) as session:
                pending = await settle_purge(session, deletion, outcome, now=now)
            _count(report, outcome, pending)


def _count(report: SweepReport, outcome: Purge, pending: bool) -> None:
    report.deletions_processed += 1
    report.deleted_objects += outcome.removed
    report.deleted_bytes += outcome.removed_bytes
    if outcome.error is not None:
        report.deletions_failed += 1
        report.errors.append(outcome.error)
    elif pending:
        report.deletions_waiting_for_url_expiry += 1
    else:
        report.deletions_finished += 1


async def _preview_deletions(context: JobContext, report: SweepReport, now: datetime) -> None:
    async with context.sessionmaker() as session:
        prefixes = (
            await session.scalars(
                select(StorageDeletion.prefix).where(
                    StorageDeletion.not_before <= now, _IS_GROUP_PREFIX
                )
            )
        ).all()
    for prefix in prefixes:
        report.deletions_processed += 1
        try:
            async for page in context.storage.list_objects(prefix):
                report.deleted_objects += len(page)
                report.deleted_bytes += sum(item.size for item in page)
        except StorageError as error:
            report.deletions_failed += 1
            report.errors.append(str(error))


def _group_of(key: str) -> int | None:
    match = _GROUP_OF_KEY.match(key)
    return int(match.group(2)) if match else None


async def _spared(
    session: AsyncSession, groups: set[int], keys: Sequence[str], now: datetime
) -> set[str]:
    """Keys that are not debris: registered masks, keys with a still valid upload URL, and
    keys a deletion record covers (a deleted group's prefix, another sweeper's fence)."""
    registered = await session.scalars(
        select(Mask.file_path).where(Mask.mask_group_id.in_(groups), Mask.file_path.in_(keys))
    )
    live = await session.scalars(
        select(MaskUpload.file_path).where(
            MaskUpload.mask_group_id.in_(groups),
            MaskUpload.file_path.in_(keys),
            MaskUpload.expires_at > now,
        )
    )
    prefixes = list(
        await session.scalars(
            select(StorageDeletion.prefix).where(StorageDeletion.mask_group_id.in_(groups))
        )
    )
    covered = {key for key in keys if any(key.startswith(prefix) for prefix in prefixes)}
    return set(registered) | set(live) | covered


async def _lock_groups(session: AsyncSession, groups: set[int]) -> None:
    # Completion holds the group lock while it checks and registers: under it, answers hold.
    await session.execute(
        select(MaskGroup.id)
        .where(MaskGroup.id.in_(groups))
        .order_by(MaskGroup.id)
        .with_for_update()
    )


async def _drop_fences(
    context: JobContext, groups: set[int], fences: Sequence[int], keys: Sequence[str]
) -> None:
    async with transaction(context.sessionmaker) as session:
        await _lock_groups(session, groups)
        await session.execute(delete(StorageDeletion).where(StorageDeletion.id.in_(fences)))
        await session.execute(
            delete(MaskUpload).where(
                MaskUpload.mask_group_id.in_(groups), MaskUpload.file_path.in_(keys)
            )
        )


async def _drop_stale_fences(context: JobContext, now: datetime) -> None:
    """Fences of a sweeper that died between its two transactions."""
    async with context.sessionmaker() as session:
        stale = (
            await session.execute(
                select(StorageDeletion.id, StorageDeletion.prefix, StorageDeletion.mask_group_id)
                .where(~_IS_GROUP_PREFIX, StorageDeletion.not_before <= now)
                .limit(CLAIM_BATCH)
            )
        ).all()
    if stale:
        groups = {row.mask_group_id for row in stale if row.mask_group_id is not None}
        await _drop_fences(
            context, groups, [row.id for row in stale], [row.prefix for row in stale]
        )


async def _sweep_debris(context: JobContext, report: SweepReport, now: datetime) -> None:
    if not report.dry_run:
        await _drop_stale_fences(context, now)
    cutoff = now - timedelta(seconds=context.settings.cleanup_grace)
    async for page in context.storage.list_objects(f"{KEY_ROOT}/"):
        old = {
            item.key: item
            for item in page
            if item.modified < cutoff and _group_of(item.key) is not None
        }
        if not old:
            continue
        groups = {group for key in old if (group := _group_of(key)) is not None}
        async with context.sessionmaker() as session:
            spared = await _spared(session, groups, list(old), now)
        candidates = [item for key, item in old.items() if key not in spared]
        if not candidates:
            continue
        if report.dry_run:
            report.debris_objects += len(candidates)
            report.debris_bytes += sum(item.size for item in candidates)
            continue
        await _remove_debris(context, report, groups, candidates, now)


async def _remove_debris(
    context: JobContext,
    report: SweepReport,
    groups: set[int],
    candidates: list[ListedObject],
    now: datetime,
) -> None:
    async with transaction(context.sessionmaker) as session:
        await _lock_groups(session, groups)
        spared = await _spared(session, groups, [item.key for item in candidates], now)
        doomed = [item for item in candidates if item.key not in spared]
        if not doomed:
            return
        fences = list(
            await session.scalars(
                insert(StorageDeletion).returning(StorageDeletion.id),
                [
                    {
                        "prefix": item.key,
                        "mask_group_id": _group_of(item.key),
                        "not_before": now + _lease(context),
                        "attempts": 0,
                        "created_at": now,
                    }
                    for item in doomed
                ],
            )
        )
    keys = [item.key for item in doomed]
    try:
        await context.storage.delete_objects(keys)
    except StorageError as error:
        report.errors.append(str(error))
    else:
        report.debris_objects += len(doomed)
        report.debris_bytes += sum(item.size for item in doomed)
    await _drop_fences(context, groups, fences, keys)
