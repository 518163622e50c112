from __future__ import annotations

from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionContext

from app.annotations import create_annotation, create_mask_group, list_annotations
from app.audit import AuditFilter, list_audit_events
from app.completion import CompletedSlice, complete_mask_upload
from app.db import transaction
from app.deletion import delete_mask_group, purge, settle_purge
from app.events import EventKind, MaskGroupEvent, group_state
from app.graphql.context import Info
from app.graphql.dicom import DicomMutation
from app.graphql.execution import FastListExecutionContext
from app.graphql.group_validation import ValidationReport
from app.graphql.live import Subscription
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
    fields_of,
    to_domain_list,
)
from app.graphql.usage import StorageUsage, storage_usage
from app.group_validation import validate_group
from app.metrics import STORAGE_ERRORS
from app.models import utcnow
from app.restoration import restore_mask_group
from app.upload_urls import SliceUpload, request_upload_urls
from app.validation import parse_id


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
        async with info.context.sessionmaker() as session:
            rows = await list_annotations(
                session,
                study_instance_uid=study_instance_uid,
                series_instance_uid=series_instance_uid,
                limit=limit,
                offset=offset,
            )
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
        return Mask.with_view_urls(row, info.context.view_urls) if row is not None else None

    @strawberry.field(description="who the bearer token belongs to")
    def me(self, info: Info) -> Principal:
        principal = info.context.principal
        return Principal(user=principal.user, role=principal.role)

    storage_usage: list[StorageUsage] = strawberry.field(
        resolver=storage_usage,
        description="stored masks and bytes by model, annotation, modality or day, from the "
        "database; ADMIN only",
    )

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
        where = AuditFilter(annotation_id, mask_group_id, actor, action)
        async with info.context.sessionmaker() as session:
            rows = await list_audit_events(
                session, info.context.principal, where, limit=limit, offset=offset
            )
        return [AuditEvent.from_row(row) for row in rows]


@strawberry.type
class Mutation(DicomMutation):
    @strawberry.mutation
    async def create_annotation(self, info: Info, input: CreateAnnotationInput) -> Annotation:
        async with transaction(info.context.sessionmaker) as session:
            annotation = await create_annotation(session, info.context.actor, **fields_of(input))
        return Annotation.from_row(annotation)

    @strawberry.mutation
    async def create_mask_group(self, info: Info, input: CreateMaskGroupInput) -> MaskGroup:
        context = info.context
        fields = fields_of(input, annotation_id=parse_id("annotationId", input.annotation_id))
        async with transaction(context.sessionmaker) as session:
            group = await create_mask_group(session, context.settings, context.actor, **fields)
            await context.events.publish(session, MaskGroupEvent.of(EventKind.CREATED, group))
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
            targets = await request_upload_urls(
                session,
                context.storage,
                context.settings,
                context.actor,
                group_id=parse_id("groupId", group_id),
                slices=to_domain_list(SliceUpload, slices),
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
        batch = to_domain_list(CompletedSlice, slices)
        # Storage is listed between short sessions, never inside a transaction.
        group, registered = await complete_mask_upload(
            context.sessionmaker,
            context.storage,
            context.settings,
            context.actor,
            group_id=parse_id("groupId", group_id),
            slices=batch,
            now=utcnow(),
        )
        async with transaction(context.sessionmaker) as session:
            event = MaskGroupEvent.of(EventKind.SLICES_COMPLETED, group)
            await context.events.publish(session, event)
        return CompleteMaskUploadPayload(
            mask_group=MaskGroup.from_row(group),
            masks=[Mask.with_view_urls(mask, context.view_urls) for mask in registered],
        )

    @strawberry.mutation(
        description="Check completeness and integrity of a group now (every slice present; "
        "each object in storage with its recorded size and MD5; each PNG readable, with the "
        "recorded and common dimensions and a mask pixel mode), store and return the report. "
        "The group's owner or an ADMIN."
    )
    async def validate_mask_group(self, info: Info, id: strawberry.ID) -> ValidationReport:
        context = info.context
        report = await validate_group(
            context.sessionmaker,
            context.storage,
            parse_id("id", id),
            events=context.events,
            actor=context.actor,
        )
        return ValidationReport.from_report(report)

    @strawberry.mutation(
        description="Delete the group, its masks and every stored object under its key prefix."
    )
    async def delete_mask_group(self, info: Info, id: strawberry.ID) -> DeleteMaskGroupPayload:
        context = info.context
        async with transaction(context.sessionmaker) as session:
            deleted = await group_state(session, parse_id("id", id))
            retention = context.settings.deleted_group_retention
            deletion = await delete_mask_group(
                session,
                context.actor,
                group_id=parse_id("id", id),
                now=utcnow(),
                retention=retention,
            )
            if deleted is not None:
                await context.events.publish(session, MaskGroupEvent.of(EventKind.DELETED, deleted))
        if retention:
            # Kept for the window: the storage sweeper purges rows and objects after it.
            return DeleteMaskGroupPayload(
                id=strawberry.ID(str(deletion.mask_group_id)),
                deleted_mask_count=deletion.deleted_mask_count,
                deleted_object_count=0,
                storage_cleanup_pending=True,
            )
        outcome = await purge(context.storage, deletion)
        if outcome.failed:
            STORAGE_ERRORS.labels("deleteMaskGroup").inc()
        async with transaction(context.sessionmaker) as session:
            pending = await settle_purge(session, deletion, outcome, now=utcnow())
        return DeleteMaskGroupPayload(
            id=strawberry.ID(str(deletion.mask_group_id)),
            deleted_mask_count=deletion.deleted_mask_count,
            deleted_object_count=outcome.removed,
            storage_cleanup_pending=pending,
        )

    @strawberry.mutation(
        description="Bring back a group deleted less than DELETED_GROUP_RETENTION seconds ago, "
        "with the same masks and stored objects; ADMIN only. NOT_FOUND once purged, CONFLICT "
        "if the group is not deleted."
    )
    async def restore_mask_group(self, info: Info, id: strawberry.ID) -> MaskGroup:
        context = info.context
        async with transaction(context.sessionmaker) as session:
            group = await restore_mask_group(session, context.actor, group_id=parse_id("id", id))
            await context.events.publish(session, MaskGroupEvent.of(EventKind.CREATED, group))
        return MaskGroup.from_row(group)


class Schema(strawberry.Schema):
    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        # The HTTP layer logs unexpected errors once, with the request id.
        del errors, execution_context


def create_schema(**options: Any) -> Schema:
    options.setdefault("execution_context_class", FastListExecutionContext)
    return Schema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        config=StrawberryConfig(scalar_map=SCALARS),
        **options,
    )


schema = create_schema()
