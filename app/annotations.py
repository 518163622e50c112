"""Annotations and their mask groups: creating them and listing annotations.

Domain functions take a session and add and flush, never commit: the caller owns the
transaction, so a batch either lands whole or not at all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import Actor, record
from app.config import Settings
from app.errors import BadUserInput, NotFound
from app.json_input import validate_json_input
from app.models import Annotation, MaskGroup, MaskGroupStatus, utcnow
from app.principals import Role, require
from app.validation import (
    DESCRIPTION_MAX,
    MODALITY_MAX,
    check_page,
    validate_text,
    validate_uid,
)


async def create_annotation(
    session: AsyncSession,
    actor: Actor,
    *,
    study_instance_uid: str,
    series_instance_uid: str | None,
    label: str | None,
) -> Annotation:
    require(actor.principal, Role.UPLOADER)
    annotation = Annotation(
        study_instance_uid=validate_uid("studyInstanceUid", study_instance_uid, required=True),
        series_instance_uid=validate_uid("seriesInstanceUid", series_instance_uid),
        label=validate_text("label", label),
        created_by=actor.principal.user,
        created_at=utcnow(),
    )
    session.add(annotation)
    await session.flush()
    await record(session, actor, "annotation.create", annotation_id=annotation.id)
    return annotation


async def create_mask_group(
    session: AsyncSession,
    settings: Settings,
    actor: Actor,
    *,
    annotation_id: int,
    group_name: str | None,
    model_name: str | None,
    version: str | None,
    modality: str | None,
    slice_count: int,
    mask_type: str,
    description: str | None,
    confidence: float | None,
    inference_parameters: Any,
) -> MaskGroup:
    require(actor.principal, Role.UPLOADER)
    if not 1 <= slice_count <= settings.max_slice_count:
        raise BadUserInput(
            f"sliceCount must be between 1 and {settings.max_slice_count}", field="sliceCount"
        )
    if not mask_type.strip():
        raise BadUserInput("maskType must not be empty", field="maskType")
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise BadUserInput("confidence must be between 0 and 1", field="confidence")
    group = MaskGroup(
        group_name=validate_text("groupName", group_name),
        model_name=validate_text("modelName", model_name),
        version=validate_text("version", version),
        modality=validate_text("modality", modality, MODALITY_MAX),
        slice_count=slice_count,
        mask_type=validate_text("maskType", mask_type, 64),
        description=validate_text("description", description, DESCRIPTION_MAX),
        confidence=confidence,
        inference_parameters=validate_json_input(
            "inferenceParameters", inference_parameters, max_bytes=settings.max_json_input_bytes
        ),
        created_by=actor.principal.user,
        created_at=utcnow(),
        status=MaskGroupStatus.PENDING,
        uploaded_slice_count=0,
        total_bytes=0,
    )
    annotation_exists = await session.scalar(
        select(Annotation.id).where(Annotation.id == annotation_id)
    )
    if annotation_exists is None:
        raise NotFound(f"annotation {annotation_id} does not exist", field="annotationId")
    group.annotation_id = annotation_id
    session.add(group)
    await session.flush()
    await record(
        session,
        actor,
        "mask_group.create",
        annotation_id=annotation_id,
        mask_group_id=group.id,
        slice_count=slice_count,
    )
    return group


ANNOTATIONS_PAGE_MAX = 500


async def list_annotations(
    session: AsyncSession,
    *,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    limit: int,
    offset: int,
) -> Sequence[Row[Any]]:
    """Newest first."""
    check_page(limit, offset, max_limit=ANNOTATIONS_PAGE_MAX)
    table = Annotation.__table__
    statement = table.select()
    if study_instance_uid is not None:
        statement = statement.where(table.c.study_instance_uid == study_instance_uid)
    if series_instance_uid is not None:
        statement = statement.where(table.c.series_instance_uid == series_instance_uid)
    statement = statement.order_by(table.c.id.desc()).limit(limit).offset(offset)
    return (await session.execute(statement)).all()
