"""Annotations and their mask groups: creating them and listing annotations.

Domain functions take a session and add and flush, never commit: the caller owns the
transaction, so a batch either lands whole or not at all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Row, Table, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import Actor, record
from app.config import Settings
from app.errors import BadUserInput, NotFound
from app.models import Annotation, MaskGroup, MaskGroupStatus, utcnow
from app.principals import Role, require
from app.validation import (
    DESCRIPTION_MAX,
    MODALITY_MAX,
    check_page,
    validate_text,
    validate_uid,
)

ANNOTATION = cast(Table, Annotation.__table__)
MAX_PAGE = 500


@dataclass(frozen=True, slots=True)
class NewAnnotation:
    study_instance_uid: str
    series_instance_uid: str | None = None
    label: str | None = None


@dataclass(frozen=True, slots=True)
class NewMaskGroup:
    annotation_id: int
    group_name: str | None = None
    model_name: str | None = None
    version: str | None = None
    modality: str | None = None
    slice_count: int = 1
    mask_type: str = "segmentation"
    description: str | None = None
    confidence: float | None = None
    inference_parameters: Any = None


async def create_annotation(session: AsyncSession, actor: Actor, new: NewAnnotation) -> Annotation:
    require(actor.principal, Role.UPLOADER)
    annotation = Annotation(
        study_instance_uid=validate_uid("studyInstanceUid", new.study_instance_uid, required=True),
        series_instance_uid=validate_uid("seriesInstanceUid", new.series_instance_uid),
        label=validate_text("label", new.label),
        created_by=actor.principal.user,
        created_at=utcnow(),
    )
    session.add(annotation)
    await session.flush()
    await record(session, actor, "annotation.create", annotation_id=annotation.id)
    return annotation


async def create_mask_group(
    session: AsyncSession, settings: Settings, actor: Actor, new: NewMaskGroup
) -> MaskGroup:
    require(actor.principal, Role.UPLOADER)
    if not 1 <= new.slice_count <= settings.max_slice_count:
        raise BadUserInput(
            f"sliceCount must be between 1 and {settings.max_slice_count}", field="sliceCount"
        )
    if not new.mask_type.strip():
        raise BadUserInput("maskType must not be empty", field="maskType")
    if new.confidence is not None and not 0.0 <= new.confidence <= 1.0:
        raise BadUserInput("confidence must be between 0 and 1", field="confidence")
    group = MaskGroup(
        group_name=validate_text("groupName", new.group_name),
        model_name=validate_text("modelName", new.model_name),
        version=validate_text("version", new.version),
        modality=validate_text("modality", new.modality, MODALITY_MAX),
        slice_count=new.slice_count,
        mask_type=validate_text("maskType", new.mask_type, 64),
        description=validate_text("description", new.description, DESCRIPTION_MAX),
        confidence=new.confidence,
        inference_parameters=new.inference_parameters,
        created_by=actor.principal.user,
        created_at=utcnow(),
        status=MaskGroupStatus.PENDING,
        uploaded_slice_count=0,
        total_bytes=0,
    )
    annotation_exists = await session.scalar(
        select(Annotation.id).where(Annotation.id == new.annotation_id)
    )
    if annotation_exists is None:
        raise NotFound(f"annotation {new.annotation_id} does not exist", field="annotationId")
    group.annotation_id = new.annotation_id
    session.add(group)
    await session.flush()
    await record(
        session,
        actor,
        "mask_group.create",
        annotation_id=new.annotation_id,
        mask_group_id=group.id,
        slice_count=new.slice_count,
    )
    return group


async def list_annotations(
    session: AsyncSession,
    *,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    limit: int,
    offset: int,
) -> Sequence[Row[Any]]:
    """Newest first."""
    check_page(limit, offset, max_limit=MAX_PAGE)
    statement = ANNOTATION.select()
    if study_instance_uid is not None:
        statement = statement.where(ANNOTATION.c.study_instance_uid == study_instance_uid)
    if series_instance_uid is not None:
        statement = statement.where(ANNOTATION.c.series_instance_uid == series_instance_uid)
    statement = statement.order_by(ANNOTATION.c.id.desc()).limit(limit).offset(offset)
    return (await session.execute(statement)).all()
