from __future__ import annotations

from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionContext

from app import masks, validation
from app.auth import Role, require
from app.db import transaction
from app.errors import BadUserInput
from app.graphql.context import Info
from app.graphql.execution import FastListExecutionContext
from app.graphql.types import (
    SCALARS,
    Annotation,
    AuditEvent,
    CompletedSliceInput,
    CompleteMaskUploadPayload,
    CreateAnnotationInput,
    CreateMaskGroupInput,
    DeleteMaskGroupPayload,
    Mask,
    MaskGroup,
    MaskUploadTarget,
    Principal,
    SliceUploadInput,
)
from app.graphql.validation import ValidationReport
from app.masks import parse_id
from app.models import Annotation as AnnotationModel
from app.models import AuditEvent as AuditEventModel
from app.models import utcnow

MAX_PAGE = 500
MAX_AUDIT_PAGE = 1000


@strawberry.type
class Query:
    @strawberry.field
    async def annotation(self, info: Info, id: strawberry.ID) -> Annotation | None:
        row = await info.context.loaders.annotation.load(parse_id("id", id))
        return Annotation.from_row(row) if row is not None else None

    @strawberry.field(description="annotations newest first, filtered by study and series UID")
    async def annotations(
        self,
        info: Info,
        study_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Annotation]:
        if not 1 <= limit <= MAX_PAGE:
            raise BadUserInput(f"limit must be between 1 and {MAX_PAGE}", field="limit")
        if offset < 0:
            raise BadUserInput("offset must not be negative", field="offset")
        statement = AnnotationModel.__table__.select()
        if study_instance_uid is not None:
            statement = statement.where(AnnotationModel.study_instance_uid == study_instance_uid)
        if series_instance_uid is not None:
            statement = statement.where(AnnotationModel.series_instance_uid == series_instance_uid)
        statement = statement.order_by(AnnotationModel.id.desc()).limit(limit).offset(offset)
        async with info.context.sessionmaker() as session:
            rows = (await session.execute(statement)).all()
        for row in rows:
            info.context.loaders.annotation.prime(row.id, row)
        return [Annotation.from_row(row) for row in rows]

    @strawberry.field
    async def mask_group(self, info: Info, id: strawberry.ID) -> MaskGroup | None:
        row = await info.context.loaders.mask_group.load(parse_id("id", id))
        return MaskGroup.from_row(row) if row is not None else None

    @strawberry.field
    async def mask(self, info: Info, id: strawberry.ID) -> Mask | None:
        row = await info.context.loaders.mask.load(parse_id("id", id))
        return Mask.from_row(row) if row is not None else None

    @strawberry.field(description="who the bearer token belongs to")
    def me(self, info: Info) -> Principal:
        principal = info.context.principal
        return Principal(user=principal.user, role=principal.role)

    @strawberry.field(description="append-only audit trail, newest first; ADMIN only")
    async def audit_events(
        self,
        info: Info,
        annotation_id: strawberry.ID | None = None,
        mask_group_id: strawberry.ID | None = None,
        actor: str | None = None,
        action: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[AuditEvent]:
        require(info.context.principal, Role.ADMIN)
        if not 1 <= limit <= MAX_AUDIT_PAGE:
            raise BadUserInput(f"limit must be between 1 and {MAX_AUDIT_PAGE}", field="limit")
        if offset < 0:
            raise BadUserInput("offset must not be negative", field="offset")
        table = AuditEventModel.__table__
        statement = table.select()
        if annotation_id is not None:
            statement = statement.where(
                table.c.annotation_id == parse_id("annotationId", annotation_id)
            )
        if mask_group_id is not None:
            statement = statement.where(
                table.c.mask_group_id == parse_id("maskGroupId", mask_group_id)
            )
        if actor is not None:
            statement = statement.where(table.c.actor == actor)
        if action is not None:
            statement = statement.where(table.c.action == action)
        statement = statement.order_by(table.c.id.desc()).limit(limit).offset(offset)
        async with info.context.sessionmaker() as session:
            rows = (await session.execute(statement)).all()
        return [AuditEvent.from_row(row) for row in rows]


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def create_annotation(self, info: Info, input: CreateAnnotationInput) -> Annotation:
        async with transaction(info.context.sessionmaker) as session:
            annotation = await masks.create_annotation(
                session,
                info.context.actor,
                study_instance_uid=input.study_instance_uid,
                series_instance_uid=input.series_instance_uid,
                label=input.label,
            )
        return Annotation.from_row(annotation)

    @strawberry.mutation
    async def create_mask_group(self, info: Info, input: CreateMaskGroupInput) -> MaskGroup:
        context = info.context
        async with transaction(context.sessionmaker) as session:
            group = await masks.create_mask_group(
                session,
                context.settings,
                context.actor,
                annotation_id=parse_id("annotationId", input.annotation_id),
                group_name=input.group_name,
                model_name=input.model_name,
                version=input.version,
                modality=input.modality,
                slice_count=input.slice_count,
                mask_type=input.mask_type,
                description=input.description,
                confidence=input.confidence,
                inference_parameters=input.inference_parameters,
            )
        return MaskGroup.from_row(group)

    @strawberry.mutation(
        description="Issue presigned PUT targets for many slices at once. May be called again "
        "for slices not yet completed (fresh URLs, e.g. after expiry). ttlSeconds defaults to "
        "the configured default (600) and is refused above the configured maximum (3600)."
    )
    async def request_mask_upload_urls(
        self,
        info: Info,
        group_id: strawberry.ID,
        slices: list[SliceUploadInput],
        ttl_seconds: int | None = None,
    ) -> list[MaskUploadTarget]:
        context = info.context
        async with transaction(context.sessionmaker) as session:
            targets = await masks.request_upload_urls(
                session,
                context.storage,
                context.settings,
                context.actor,
                group_id=parse_id("groupId", group_id),
                slices=[
                    masks.SliceUpload(
                        slice_index=item.slice_index,
                        label_name=item.label_name,
                        content_type=item.content_type,
                        file_size=item.file_size,
                        content_md5=item.content_md5,
                    )
                    for item in slices
                ],
                ttl_seconds=ttl_seconds,
                now=utcnow(),
            )
        return [MaskUploadTarget.from_target(target) for target in targets]

    @strawberry.mutation(
        description="Register uploaded slices after verifying in storage that each object "
        "exists with the declared size and MD5 (UPLOAD_INCOMPLETE / CHECKSUM_MISMATCH "
        "otherwise, listing the slices). Idempotent: completing an already registered slice "
        "again with the same object is a no-op."
    )
    async def complete_mask_upload(
        self, info: Info, group_id: strawberry.ID, slices: list[CompletedSliceInput]
    ) -> CompleteMaskUploadPayload:
        context = info.context
        async with transaction(context.sessionmaker) as session:
            group, registered = await masks.complete_upload(
                session,
                context.storage,
                context.settings,
                context.actor,
                group_id=parse_id("groupId", group_id),
                slices=[
                    masks.CompletedSlice(
                        slice_index=item.slice_index,
                        label_name=item.label_name,
                        sop_instance_uid=item.sop_instance_uid,
                        width=item.width,
                        height=item.height,
                        confidence=item.confidence,
                    )
                    for item in slices
                ],
                now=utcnow(),
            )
        return CompleteMaskUploadPayload(
            mask_group=MaskGroup.from_row(group),
            masks=[Mask.from_row(mask) for mask in registered],
        )

    @strawberry.mutation(
        description="Check completeness and integrity of a group now (every slice present; "
        "each object in storage with its recorded size and MD5; each PNG readable, with the "
        "recorded and common dimensions and a mask pixel mode), store and return the report. "
        "The group's owner or an ADMIN."
    )
    async def validate_mask_group(self, info: Info, id: strawberry.ID) -> ValidationReport:
        context = info.context
        require(context.principal, Role.UPLOADER)
        report = await validation.validate_group(
            context.sessionmaker, context.storage, parse_id("id", id), actor=context.actor
        )
        return ValidationReport.from_report(report)

    @strawberry.mutation(
        description="Delete the group, its masks and every stored object under its key prefix."
    )
    async def delete_mask_group(self, info: Info, id: strawberry.ID) -> DeleteMaskGroupPayload:
        context = info.context
        async with transaction(context.sessionmaker) as session:
            deletion = await masks.delete_mask_group(
                session, context.actor, group_id=parse_id("id", id), now=utcnow()
            )
        removed, failed = await masks.purge_storage_deletion(
            context.sessionmaker,
            context.storage,
            deletion.storage_deletion_id,
            prefix=deletion.prefix,
            upload_expires_at=deletion.upload_expires_at,
        )
        return DeleteMaskGroupPayload(
            id=strawberry.ID(str(deletion.mask_group_id)),
            deleted_mask_count=deletion.deleted_mask_count,
            deleted_object_count=removed,
            storage_cleanup_pending=failed,
        )


class Schema(strawberry.Schema):
    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        # The HTTP layer logs unexpected errors once, with the request id.
        del errors, execution_context


def create_schema(**options: Any) -> Schema:
    options.setdefault("execution_context_class", FastListExecutionContext)
    return Schema(
        query=Query, mutation=Mutation, config=StrawberryConfig(scalar_map=SCALARS), **options
    )


schema = create_schema()
