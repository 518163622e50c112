"""The PACS mutations: SEG export (recorded here, run by the `dicom-export` job) and SEG
import (run inside the request)."""

from __future__ import annotations

import strawberry

from app.db import transaction
from app.dicom.export import EXPORT_JOB, request_export
from app.graphql.context import Info
from app.graphql.types import DicomExport, MaskGroup
from app.models import DicomExportStatus, utcnow
from app.validation import parse_id


@strawberry.type
class DicomMutation:
    @strawberry.mutation(
        description="build a DICOM SEG of a COMPLETE group, aligned to its source series "
        "fetched from the PACS, and store it in the PACS (STOW-RS); runs in the background"
    )
    async def export_mask_group_to_pacs(self, info: Info, id: strawberry.ID) -> DicomExport:
        context = info.context
        async with transaction(context.sessionmaker) as session:
            export = await request_export(
                session, context.settings, context.actor, group_id=parse_id("id", id), now=utcnow()
            )
        if export.status is DicomExportStatus.PENDING:
            # After the commit, so the run finds the row.
            context.jobs.wake(EXPORT_JOB)
        return DicomExport.from_row(export)

    @strawberry.mutation(
        description="create a mask group from a DICOM SEG instance stored in the PACS: one "
        "PNG per source slice and segment"
    )
    async def import_dicom_seg(
        self,
        info: Info,
        annotation_id: strawberry.ID,
        series_instance_uid: str,
        sop_instance_uid: str,
    ) -> MaskGroup:
        # The DICOM stack is loaded by the first import, not by every server process.
        from app.dicom.imports import import_seg

        context = info.context
        group = await import_seg(
            context.sessionmaker,
            context.storage,
            context.settings,
            context.actor,
            annotation_id=parse_id("annotationId", annotation_id),
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
        )
        return MaskGroup.from_row(group)
