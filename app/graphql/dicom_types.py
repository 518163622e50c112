from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import strawberry

from app import models


@strawberry.enum
class DicomExportStatus(enum.Enum):
    PENDING = strawberry.enum_value("PENDING", description="requested, not yet claimed")
    RUNNING = strawberry.enum_value("RUNNING", description="a worker is building or storing it")
    DONE = strawberry.enum_value("DONE", description="stored in the PACS and listed by it")
    FAILED = strawberry.enum_value("FAILED", description="see error; asking again retries")


@strawberry.type
class DicomExport:
    status: DicomExportStatus
    series_instance_uid: str | None = strawberry.field(
        description="the DICOM SEG instance written (null until DONE)"
    )
    sop_instance_uid: str | None
    segment_count: int | None = strawberry.field(
        description="number of segments and frames in the SEG"
    )
    frame_count: int | None
    requested_at: datetime
    finished_at: datetime | None
    error: str | None = strawberry.field(
        description="why it failed, in words (source series not found in the PACS, slice "
        "count differs, ...)"
    )

    @classmethod
    def from_row(cls, row: Any) -> DicomExport:
        return cls(
            status=DicomExportStatus[models.DicomExportStatus(row.status).name],
            series_instance_uid=row.series_instance_uid,
            sop_instance_uid=row.sop_instance_uid,
            segment_count=row.segment_count,
            frame_count=row.frame_count,
            requested_at=row.requested_at,
            finished_at=row.finished_at,
            error=row.error,
        )
