from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    event,
    exists,
    func,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import (
    Mapped,
    ORMExecuteState,
    Session,
    mapped_column,
    relationship,
    with_loader_criteria,
)

from app.db import Base
from app.principals import Role


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend: SQLite stores naive values and returns them naive."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class MaskGroupStatus(enum.Enum):
    PENDING = "PENDING"
    UPLOADING = "UPLOADING"
    COMPLETE = "COMPLETE"


# Id columns are 32-bit integers (PostgreSQL's integer); no row has a larger id.
MAX_ID = 2**31 - 1

# Ids are never reused (SQLite would reuse the highest after a delete without AUTOINCREMENT):
# audit records and logs keep naming them after the rows are gone.
NO_ID_REUSE = {"sqlite_autoincrement": True}


class Annotation(Base):
    __tablename__ = "annotation_annotation"
    __table_args__ = NO_ID_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    label: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    mask_groups: Mapped[list[MaskGroup]] = relationship(
        back_populates="annotation", lazy="raise", passive_deletes=True
    )


class MaskGroup(Base):
    __tablename__ = "annotation_mask_group"
    __table_args__ = NO_ID_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotation_id: Mapped[int] = mapped_column(
        ForeignKey("annotation_annotation.id", ondelete="CASCADE"), index=True
    )
    group_name: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(Text, index=True)
    version: Mapped[str | None] = mapped_column(Text)
    modality: Mapped[str | None] = mapped_column(Text)
    slice_count: Mapped[int] = mapped_column(Integer, default=1)
    mask_type: Mapped[str] = mapped_column(Text, default="segmentation")
    description: Mapped[str | None] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Float)
    inference_parameters: Mapped[Any] = mapped_column(JSON, nullable=True)
    created_by: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[MaskGroupStatus] = mapped_column(
        Enum(MaskGroupStatus, native_enum=False, length=16, validate_strings=True),
        default=MaskGroupStatus.PENDING,
    )
    # Kept with the registering statement so the group list never aggregates its masks.
    uploaded_slice_count: Mapped[int] = mapped_column(Integer, default=0)
    # Stored objects (a slice with labels has several): storage usage sums these.
    object_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Latest expiry of a PUT URL issued for the group: an upload can land until then, so
    # storage cleanup after a delete must look again at that moment.
    upload_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set when deleteMaskGroup keeps the group for DELETED_GROUP_RETENTION seconds: every
    # query stops seeing it (`hide_deleted_groups`) until restoreMaskGroup or the sweeper.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    deleted_by: Mapped[str | None] = mapped_column(Text)

    annotation: Mapped[Annotation] = relationship(back_populates="mask_groups", lazy="raise")
    masks: Mapped[list[Mask]] = relationship(
        back_populates="mask_group", lazy="raise", passive_deletes=True
    )


class Mask(Base):
    __tablename__ = "annotation_mask"
    __table_args__ = (
        # The slice triple is unique; a missing label is one value, not many (NULL != NULL).
        Index(
            "uq_annotation_mask_slice",
            "mask_group_id",
            "slice_index",
            func.coalesce("label_name", ""),
            unique=True,
        ),
        NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mask_group_id: Mapped[int] = mapped_column(
        ForeignKey("annotation_mask_group.id", ondelete="CASCADE"), index=True
    )
    slice_index: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    label_name: Mapped[str | None] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(Text)
    mime_type: Mapped[str] = mapped_column(String(64), default="image/png")
    file_size: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(36))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # The model's confidence in this slice, 0..1 (optional model metadata).
    confidence: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    mask_group: Mapped[MaskGroup] = relationship(back_populates="masks", lazy="raise")


class MaskUpload(Base):
    """A PUT URL issued and not yet completed: what the client declared it would upload."""

    __tablename__ = "annotation_mask_upload"
    __table_args__ = (
        Index(
            "uq_annotation_mask_upload_slice",
            "mask_group_id",
            "slice_index",
            func.coalesce("label_name", ""),
            unique=True,
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mask_group_id: Mapped[int] = mapped_column(
        ForeignKey("annotation_mask_group.id", ondelete="CASCADE"), index=True
    )
    slice_index: Mapped[int] = mapped_column(Integer)
    label_name: Mapped[str | None] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(64))
    file_size: Mapped[int] = mapped_column(BigInteger)
    content_md5: Mapped[str] = mapped_column(String(32))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# Deleted groups (and their masks) are invisible to every ORM read unless the statement asks
# with `.execution_options(include_deleted=True)`: restore and the sweeper do. A plain table
# alias, not the mapped class, so the criteria below do not filter their own subquery.
_DELETED_GROUP = MaskGroup.__table__.alias("deleted_group")
INCLUDE_DELETED = {"include_deleted": True}


@event.listens_for(Session, "do_orm_execute")
def hide_deleted_groups(state: ORMExecuteState) -> None:
    if (
        not state.is_select
        or state.is_column_load
        or state.is_relationship_load
        or state.execution_options.get("include_deleted", False)
    ):
        return
    state.statement = state.statement.options(
        with_loader_criteria(
            MaskGroup, lambda group: group.deleted_at.is_(None), include_aliases=True
        ),
        with_loader_criteria(
            Mask, lambda mask: in_live_group(mask.mask_group_id), include_aliases=True
        ),
    )


def in_live_group(mask_group_id: Any) -> ColumnElement[bool]:
    """The condition for a mask's (or upload's) `mask_group_id` column, for Core reads the
    criteria above do not reach."""
    return ~exists().where(
        _DELETED_GROUP.c.id == mask_group_id, _DELETED_GROUP.c.deleted_at.is_not(None)
    )


class StorageDeletion(Base):
    """Objects under a prefix that must be removed from storage; a row is dropped only once
    storage confirmed it and no issued upload URL can still write there."""

    __tablename__ = "storage_deletion"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(Text)
    # Indexed: completion looks for records naming its keys (the sweeper's debris fence).
    mask_group_id: Mapped[int | None] = mapped_column(Integer, index=True)
    # When the next attempt is due (backoff after a failure, or the final sweep).
    not_before: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The last moment an upload URL issued before the delete can write under the prefix: the
    # record goes only after a sweep at or after it.
    urls_expire_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobRun(Base):
    """One row per background job: which replica runs it now and when it is due again."""

    __tablename__ = "job_run"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    locked_by: Mapped[str | None] = mapped_column(Text)
    last_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class ValidationStatus(enum.Enum):
    VALID = "VALID"
    INVALID = "INVALID"


class MaskGroupValidation(Base):
    """One run of the validation of a group; the newest row is the group's report."""

    __tablename__ = "mask_group_validation"
    __table_args__ = NO_ID_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mask_group_id: Mapped[int] = mapped_column(
        ForeignKey("annotation_mask_group.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[ValidationStatus] = mapped_column(
        Enum(ValidationStatus, native_enum=False, length=16, validate_strings=True)
    )
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    problem_count: Mapped[int] = mapped_column(Integer, default=0)
    # At most the first 1000 problems, as {sliceIndex, code, message}.
    problems: Mapped[Any] = mapped_column(JSON)
    checked_by: Mapped[str | None] = mapped_column(Text)
    # How many masks the run saw: masks are only ever added, so a report is current while the
    # group still has this many (the validation job's test).
    mask_count: Mapped[int | None] = mapped_column(Integer)


class ValidationRequest(Base):
    """A group waiting for the validation job: one row per group, claimed with `claim_due`;
    the transaction that stores a report of the group deletes it."""

    __tablename__ = "mask_group_validation_request"

    mask_group_id: Mapped[int] = mapped_column(
        ForeignKey("annotation_mask_group.id", ondelete="CASCADE"), primary_key=True
    )
    # When the next attempt is due (now, or after a backoff, or past a claim's lease).
    due_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


class ApiToken(Base):
    """A bearer token of ours; only its SHA-256 is stored (tokens are long random secrets,
    so a fast hash is enough and keeps the per-request lookup an index probe)."""

    __tablename__ = "api_token"
    __table_args__ = NO_ID_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(128), index=True)
    role: Mapped[Role] = mapped_column(
        Enum(Role, native_enum=False, length=16, validate_strings=True)
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, to tell tokens apart in listings without revealing them.
    token_prefix: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """Append-only (database triggers refuse UPDATE and DELETE). No foreign keys: the record of
    a deletion outlives what was deleted."""

    __tablename__ = "audit_event"
    __table_args__ = NO_ID_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    annotation_id: Mapped[int | None] = mapped_column(Integer, index=True)
    mask_group_id: Mapped[int | None] = mapped_column(Integer, index=True)
    slice_count: Mapped[int | None] = mapped_column(Integer)
    byte_count: Mapped[int | None] = mapped_column(BigInteger)
    request_id: Mapped[str | None] = mapped_column(String(64))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    detail: Mapped[Any] = mapped_column(JSON, nullable=True)


class DicomExportStatus(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


class DicomExport(Base):
    """One request to export a mask group as DICOM SEG to the PACS, claimed by a worker with
    FOR UPDATE SKIP LOCKED; the latest row of a group is its `dicomExport` status."""

    __tablename__ = "dicom_export"
    __table_args__ = NO_ID_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mask_group_id: Mapped[int] = mapped_column(
        ForeignKey("annotation_mask_group.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[DicomExportStatus] = mapped_column(
        Enum(DicomExportStatus, native_enum=False, length=16, validate_strings=True), index=True
    )
    requested_by: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set when a worker claims the row; a RUNNING row whose claim is older than the stale
    # limit belonged to a worker that died and may be claimed again.
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    segment_count: Mapped[int | None] = mapped_column(Integer)
    frame_count: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
