"""DICOM SEG export: requesting it (in the mutation's transaction) and running it (the
`dicom-export` job of `app.jobs`).

`request_export` records a PENDING `dicom_export` row; nothing else happens in the request.
`export_job`, run by every replica's job runner every DICOM_EXPORT_INTERVAL_SECONDS (and at
once when the mutation wakes it), takes the pending rows, and `run_export(job_id)` claims each
with `FOR UPDATE SKIP LOCKED` (PostgreSQL; SQLite serialises writers with BEGIN IMMEDIATE)
in a short transaction, then works with no transaction open (reading masks from storage, the
source series from the PACS, building and storing the SEG), and records DONE with the SEG's
UIDs or FAILED with the reason in words. Nothing is written to the PACS unless the SEG was
built whole, and a FAILED export leaves no row but its own; asking again makes a new row.
Any number of runners may run at once: a row is claimed by one of them only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit import Actor, record
from app.config import Settings
from app.db import transaction
from app.dicom.errors import PacsNotConfigured
from app.dicom.refs import GroupInfo, MaskRef, SegSummary
from app.errors import AppError, BadUserInput, Conflict, NotFound
from app.jobs import JobContext
from app.models import (
    Annotation,
    DicomExport,
    DicomExportStatus,
    Mask,
    MaskGroup,
    MaskGroupStatus,
    utcnow,
)
from app.principals import require_owner
from app.storage import Storage, StorageError

if TYPE_CHECKING:
    import highdicom as hd

    from app.dicom.pacs import Pacs

logger = logging.getLogger(__name__)

# A RUNNING export claimed longer ago than this belonged to a worker that died.
STALE_AFTER = timedelta(minutes=30)
ERROR_MAX = 2000
# The job's name in `app.main.JOBS`, which the mutation wakes.
EXPORT_JOB = "dicom-export"
# Exports one job run looks up at a time.
EXPORT_BATCH = 20


@dataclass(frozen=True, slots=True)
class ExportSource:
    """What an export needs from the database, read in one short session."""

    group: GroupInfo
    study_instance_uid: str
    series_instance_uid: str
    masks: list[MaskRef]


async def request_export(
    session: AsyncSession, settings: Settings, actor: Actor, *, group_id: int, now: datetime
) -> DicomExport:
    """A PENDING export of a COMPLETE group; an export of it still pending or running is
    returned instead of a second one."""
    if not settings.dicomweb_url:
        raise PacsNotConfigured()
    group = await session.scalar(
        select(MaskGroup).where(MaskGroup.id == group_id).with_for_update()
    )
    if group is None:
        raise NotFound(f"mask group {group_id} does not exist", field="id")
    require_owner(actor.principal, group.created_by, f"mask group {group_id}")
    if group.status is not MaskGroupStatus.COMPLETE:
        raise Conflict(
            f"mask group {group_id} is {group.status.value}: only a COMPLETE group can be exported"
        )
    series = await session.scalar(
        select(Annotation.series_instance_uid).where(Annotation.id == group.annotation_id)
    )
    if series is None:
        raise BadUserInput(
            f"annotation {group.annotation_id} names no seriesInstanceUid: the source series "
            "of the SEG is unknown"
        )
    running = await session.scalar(
        select(DicomExport).where(
            DicomExport.mask_group_id == group_id,
            DicomExport.status.in_([DicomExportStatus.PENDING, DicomExportStatus.RUNNING]),
        )
    )
    if running is not None:
        return running
    export = DicomExport(
        mask_group_id=group_id,
        status=DicomExportStatus.PENDING,
        requested_by=actor.principal.user,
        requested_at=now,
        attempts=0,
    )
    session.add(export)
    await session.flush()
    await record(
        session,
        actor,
        "mask_group.export_seg",
        annotation_id=group.annotation_id,
        mask_group_id=group_id,
        detail={"dicomExportId": export.id},
    )
    return export


async def load_export_source(session: AsyncSession, group_id: int) -> ExportSource:
    row = (
        await session.execute(
            select(MaskGroup, Annotation.study_instance_uid, Annotation.series_instance_uid)
            .join(Annotation, Annotation.id == MaskGroup.annotation_id)
            .where(MaskGroup.id == group_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"mask group {group_id} does not exist")
    group: MaskGroup = row[0]
    if group.status is not MaskGroupStatus.COMPLETE:
        raise Conflict(
            f"mask group {group_id} is {group.status.value}: only a COMPLETE group can be exported"
        )
    if row.series_instance_uid is None:
        raise BadUserInput(f"annotation {group.annotation_id} names no seriesInstanceUid")
    masks = await session.execute(
        select(Mask.slice_index, Mask.label_name, Mask.sop_instance_uid, Mask.file_path)
        .where(Mask.mask_group_id == group_id)
        .order_by(Mask.slice_index, Mask.label_name)
    )
    return ExportSource(
        group=GroupInfo(
            group_id=group.id,
            group_name=group.group_name,
            model_name=group.model_name,
            version=group.version,
            description=group.description,
            slice_count=group.slice_count,
        ),
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        masks=[MaskRef(*mask) for mask in masks],
    )


async def _claim(
    sessionmaker: async_sessionmaker[AsyncSession], job_id: int, now: datetime
) -> int | None:
    """The group of the claimed export, None when another worker has it or it is finished."""
    async with transaction(sessionmaker) as session:
        export = await session.scalar(
            select(DicomExport)
            .where(
                DicomExport.id == job_id,
                or_(
                    DicomExport.status == DicomExportStatus.PENDING,
                    (DicomExport.status == DicomExportStatus.RUNNING)
                    & (DicomExport.claimed_at < now - STALE_AFTER),
                ),
            )
            .with_for_update(skip_locked=True)
        )
        if export is None:
            return None
        export.status = DicomExportStatus.RUNNING
        export.claimed_at = now
        export.attempts += 1
        export.error = None
        return export.mask_group_id


async def _finish(
    sessionmaker: async_sessionmaker[AsyncSession],
    job_id: int,
    *,
    result: SegSummary | None,
    error: str | None,
) -> None:
    values: dict[str, Any] = {"finished_at": utcnow(), "error": error}
    if result is not None:
        values.update(
            status=DicomExportStatus.DONE,
            series_instance_uid=result.series_instance_uid,
            sop_instance_uid=result.sop_instance_uid,
            segment_count=result.segment_count,
            frame_count=result.frame_count,
        )
    else:
        values["status"] = DicomExportStatus.FAILED
    async with transaction(sessionmaker) as session:
        await session.execute(update(DicomExport).where(DicomExport.id == job_id).values(values))


async def group_seg(
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    settings: Settings,
    group_id: int,
    *,
    source_dir: Path | None = None,
) -> hd.seg.Segmentation:
    """The group's SEG, built now, aligned to its source series read from `source_dir` when
    given, else from the PACS (no transaction is held while it is built)."""
    # The DICOM stack is loaded by the first export, not by every server process.
    from app.dicom.pacs import Pacs
    from app.dicom.seg import build_seg
    from app.dicom.source import read_source_dir

    async with sessionmaker() as session:
        export_source = await load_export_source(session, group_id)
    if source_dir is not None:
        source = await asyncio.to_thread(
            read_source_dir,
            source_dir,
            export_source.study_instance_uid,
            export_source.series_instance_uid,
        )
    else:
        pacs = Pacs(settings)
        try:
            source = await pacs.source_series(
                export_source.study_instance_uid, export_source.series_instance_uid
            )
        finally:
            pacs.close()
    return await build_seg(storage, export_source.group, export_source.masks, source)


async def export_to_pacs(storage: Storage, pacs: Pacs, export_source: ExportSource) -> SegSummary:
    from app.dicom.seg import build_seg, summary

    source = await pacs.source_series(
        export_source.study_instance_uid, export_source.series_instance_uid
    )
    seg = await build_seg(storage, export_source.group, export_source.masks, source)
    await pacs.store(seg)
    return summary(seg)


async def run_export(
    job_id: int,
    *,
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    settings: Settings,
) -> DicomExportStatus | None:
    """Claims and runs one export; returns its final status, None if it was not ours."""
    group_id = await _claim(sessionmaker, job_id, utcnow())
    if group_id is None:
        return None
    from app.dicom.pacs import Pacs

    pacs: Pacs | None = None
    try:
        async with sessionmaker() as session:
            export_source = await load_export_source(session, group_id)
        pacs = Pacs(settings)
        result = await export_to_pacs(storage, pacs, export_source)
    except (AppError, StorageError) as error:
        message = error.message if isinstance(error, AppError) else f"storage: {error}"
        logger.warning("DICOM export %s of group %s failed: %s", job_id, group_id, message)
        await _finish(sessionmaker, job_id, result=None, error=message[:ERROR_MAX])
        return DicomExportStatus.FAILED
    except Exception:
        logger.exception("DICOM export %s of group %s failed unexpectedly", job_id, group_id)
        await _finish(
            sessionmaker,
            job_id,
            result=None,
            error="unexpected error while exporting (see the server log)",
        )
        return DicomExportStatus.FAILED
    finally:
        if pacs is not None:
            pacs.close()
    await _finish(sessionmaker, job_id, result=result, error=None)
    return DicomExportStatus.DONE


async def pending_export_ids(
    sessionmaker: async_sessionmaker[AsyncSession], limit: int = 100
) -> Sequence[int]:
    """Exports a runner should try (`run_export` claims each or skips it)."""
    stale = utcnow() - STALE_AFTER
    async with sessionmaker() as session:
        rows: Sequence[Row[Any]] = (
            await session.execute(
                select(DicomExport.id)
                .where(
                    or_(
                        DicomExport.status == DicomExportStatus.PENDING,
                        (DicomExport.status == DicomExportStatus.RUNNING)
                        & (DicomExport.claimed_at < stale),
                    )
                )
                .order_by(DicomExport.id)
                .limit(limit)
            )
        ).all()
    return [row.id for row in rows]


@dataclass
class ExportReport:
    done: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    # Pending when listed, claimed by another runner before this one could.
    taken_by_another: int = 0

    def __bool__(self) -> bool:
        # An idle poll has nothing to report (`JobRunner` logs it at debug level only).
        return bool(self.done or self.failed or self.taken_by_another)


async def export_job(context: JobContext) -> ExportReport:
    """The `dicom-export` job (`app.main.JOBS`): runs the pending exports and those whose
    claim went stale, one after the other, until none is left that this runner can claim."""
    report = ExportReport()
    while True:
        job_ids = await pending_export_ids(context.sessionmaker, limit=EXPORT_BATCH)
        ours = 0
        for job_id in job_ids:
            status = await run_export(
                job_id,
                sessionmaker=context.sessionmaker,
                storage=context.storage,
                settings=context.settings,
            )
            if status is None:
                report.taken_by_another += 1
                continue
            ours += 1
            (report.done if status is DicomExportStatus.DONE else report.failed).append(job_id)
        # A short batch was all there was; a full one of others' claims would repeat itself.
        if len(job_ids) < EXPORT_BATCH or ours == 0:
            return report
