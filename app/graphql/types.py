from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NewType
from urllib.parse import urlencode

import strawberry
from strawberry.scalars import JSON
from strawberry.schema.name_converter import NameConverter
from strawberry.types.base import StrawberryOptional
from strawberry.types.scalar import ScalarDefinition

from app import auth, models
from app.errors import BadUserInput
from app.graphql.context import Info
from app.graphql.loaders import MaskFilter
from app.graphql.validation import ValidationReport
from app.masks import UploadTarget
from app.models import utcnow
from app.storage import SignedRequest


def _parse_big_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError("BigInt must be an integer")
    return int(value)


BigInt = NewType("BigInt", int)

SCALARS: dict[object, ScalarDefinition] = {
    BigInt: strawberry.scalar(
        name="BigInt",
        description="Integer that may exceed 32 bits (byte counts), serialized as a JSON number.",
        serialize=int,
        parse_value=_parse_big_int,
    )
}


@strawberry.enum
class MaskGroupStatus(enum.Enum):
    PENDING = strawberry.enum_value("PENDING", description="created, no slice registered yet")
    UPLOADING = strawberry.enum_value(
        "UPLOADING", description="some but not all slices 0..sliceCount-1 registered"
    )
    COMPLETE = strawberry.enum_value(
        "COMPLETE", description="every slice 0..sliceCount-1 has at least one registered mask"
    )


# Registers the domain enum with GraphQL in place; fields use auth.Role itself.
strawberry.enum(
    auth.Role,
    name="Role",
    description="READER: queries, views and downloads. UPLOADER: READER + create annotations "
    "and groups, upload, complete, delete own groups. ADMIN: everything, including the audit "
    "log and any group.",
)


@strawberry.type
class Principal:
    user: str
    role: auth.Role


@strawberry.type
class AuditEvent:
    id: strawberry.ID
    occurred_at: datetime
    actor: str
    action: str = strawberry.field(
        description="annotation.create, mask_group.create, upload_urls.issue, upload.complete, "
        "mask_group.delete, mask_group.validate, token.create, token.revoke"
    )
    annotation_id: strawberry.ID | None
    mask_group_id: strawberry.ID | None
    slice_count: int | None
    byte_count: BigInt | None
    request_id: str | None
    client_ip: str | None
    user_agent: str | None
    detail: JSON | None

    @classmethod
    def from_row(cls, row: Any) -> AuditEvent:
        return cls(
            id=strawberry.ID(str(row.id)),
            occurred_at=row.occurred_at,
            actor=row.actor,
            action=row.action,
            annotation_id=_optional_id(row.annotation_id),
            mask_group_id=_optional_id(row.mask_group_id),
            slice_count=row.slice_count,
            byte_count=row.byte_count,
            request_id=row.request_id,
            client_ip=row.client_ip,
            user_agent=row.user_agent,
            detail=row.detail,
        )


def _optional_id(value: int | None) -> strawberry.ID | None:
    return strawberry.ID(str(value)) if value is not None else None


@strawberry.type
class HttpHeader:
    name: str
    value: str


@strawberry.type
class SignedUrl:
    url: str
    method: str
    headers: list[HttpHeader] = strawberry.field(
        description="headers the client must send as given (they are part of the signature)"
    )
    expires_at: datetime

    @classmethod
    def from_request(cls, signed: SignedRequest) -> SignedUrl:
        return cls(
            url=signed.url,
            method=signed.method,
            headers=[HttpHeader(name=name, value=value) for name, value in signed.headers],
            expires_at=signed.expires_at,
        )


def _ttl(info: Info, ttl_seconds: int | None) -> int:
    settings = info.context.settings
    ttl = settings.signed_url_default_ttl if ttl_seconds is None else ttl_seconds
    if not 1 <= ttl <= settings.signed_url_max_ttl:
        raise BadUserInput(
            f"ttlSeconds must be between 1 and {settings.signed_url_max_ttl}", field="ttlSeconds"
        )
    return ttl


@strawberry.type
class Annotation:
    id: strawberry.ID
    study_instance_uid: str
    series_instance_uid: str | None
    label: str | None
    created_by: str | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> Annotation:
        return cls(
            id=strawberry.ID(str(row.id)),
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            label=row.label,
            created_by=row.created_by,
            created_at=row.created_at,
        )

    @strawberry.field
    async def mask_groups(self, info: Info) -> list[MaskGroup]:
        rows = await info.context.loaders.groups_of_annotation.load(int(self.id))
        return [MaskGroup.from_row(row) for row in rows]


@strawberry.type
class MaskGroup:
    id: strawberry.ID
    annotation_id: strawberry.ID
    group_name: str | None
    model_name: str | None
    version: str | None
    modality: str | None
    slice_count: int
    mask_type: str
    description: str | None
    confidence: float | None = strawberry.field(
        description="model's overall confidence for this result, 0..1"
    )
    inference_parameters: JSON | None = strawberry.field(
        description="free-form inference parameters (checkpoint, thresholds, ...)"
    )
    created_by: str | None
    created_at: datetime
    status: MaskGroupStatus
    uploaded_slice_count: int
    total_bytes: BigInt

    @classmethod
    def from_row(cls, row: Any) -> MaskGroup:
        return cls(
            id=strawberry.ID(str(row.id)),
            annotation_id=strawberry.ID(str(row.annotation_id)),
            group_name=row.group_name,
            model_name=row.model_name,
            version=row.version,
            modality=row.modality,
            slice_count=row.slice_count,
            mask_type=row.mask_type,
            description=row.description,
            confidence=row.confidence,
            inference_parameters=row.inference_parameters,
            created_by=row.created_by,
            created_at=row.created_at,
            status=MaskGroupStatus[models.MaskGroupStatus(row.status).name],
            uploaded_slice_count=row.uploaded_slice_count,
            total_bytes=row.total_bytes,
        )

    @strawberry.field
    async def annotation(self, info: Info) -> Annotation:
        row = await info.context.loaders.annotation.load(int(self.annotation_id))
        return Annotation.from_row(row)

    @strawberry.field(description="latest validation, null until the group has been validated")
    async def validation(self, info: Info) -> ValidationReport | None:
        report = await info.context.loaders.validation_of_group.load(int(self.id))
        return ValidationReport.from_report(report) if report is not None else None

    @strawberry.field
    async def missing_slice_indexes(self, info: Info) -> list[int]:
        if self.uploaded_slice_count >= self.slice_count:
            return []
        present = await info.context.loaders.slice_indexes_of_group.load(int(self.id))
        return [index for index in range(self.slice_count) if index not in present]

    @strawberry.field(
        description="masks ordered by sliceIndex then labelName; sliceIndexFrom/To are inclusive"
    )
    async def masks(
        self,
        info: Info,
        slice_index_from: int | None = None,
        slice_index_to: int | None = None,
        label_name: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Mask]:
        if limit is not None and limit < 0:
            raise BadUserInput("limit must not be negative", field="limit")
        if offset < 0:
            raise BadUserInput("offset must not be negative", field="offset")
        mask_filter = MaskFilter(slice_index_from, slice_index_to, label_name, limit, offset)
        rows = await info.context.loaders.masks_of_group.load((int(self.id), mask_filter))
        return [Mask.from_row(row) for row in rows]


@strawberry.type
class Mask:
    id: strawberry.ID
    mask_group_id: strawberry.ID
    slice_index: int
    sop_instance_uid: str | None
    label_name: str | None
    file_path: str = strawberry.field(
        description="object key, mask/{annotationId}/{groupId}/{filename}"
    )
    mime_type: str
    file_size: BigInt
    checksum: str = strawberry.field(
        description="md5:<32 lowercase hex>, as verified in storage on completion"
    )
    width: int | None
    height: int | None
    confidence: float | None = strawberry.field(
        description="the model's confidence in this slice, 0..1"
    )
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> Mask:
        return cls(
            id=strawberry.ID(str(row.id)),
            mask_group_id=strawberry.ID(str(row.mask_group_id)),
            slice_index=row.slice_index,
            sop_instance_uid=row.sop_instance_uid,
            label_name=row.label_name,
            file_path=row.file_path,
            mime_type=row.mime_type,
            file_size=row.file_size,
            checksum=row.checksum,
            width=row.width,
            height=row.height,
            confidence=row.confidence,
            created_at=row.created_at,
        )

    @strawberry.field(description="presigned GET for the stored object")
    def download_url(self, info: Info, ttl_seconds: int | None = None) -> SignedUrl:
        ttl = _ttl(info, ttl_seconds)
        signed = info.context.storage.presign_get(self.file_path, expires_in=ttl, now=utcnow())
        return SignedUrl.from_request(signed)

    @strawberry.field(
        description="same-origin path that streams the image through the server: "
        "/api/mask-group/{groupId}/view?slice=N[&label=L]"
    )
    def view_url(self) -> str:
        query: dict[str, str | int] = {"slice": self.slice_index}
        if self.label_name:
            query["label"] = self.label_name
        return f"/api/mask-group/{self.mask_group_id}/view?{urlencode(query)}"


@strawberry.type
class MaskUploadTarget:
    slice_index: int
    label_name: str | None
    file_path: str
    url: str
    method: str
    headers: list[HttpHeader]
    expires_at: datetime

    @classmethod
    def from_target(cls, target: UploadTarget) -> MaskUploadTarget:
        signed = target.request
        return cls(
            slice_index=target.slice_index,
            label_name=target.label_name,
            file_path=target.file_path,
            url=signed.url,
            method=signed.method,
            headers=[HttpHeader(name=name, value=value) for name, value in signed.headers],
            expires_at=signed.expires_at,
        )


@strawberry.type
class CompleteMaskUploadPayload:
    mask_group: MaskGroup
    masks: list[Mask]


@strawberry.type
class DeleteMaskGroupPayload:
    id: strawberry.ID
    deleted_mask_count: int
    deleted_object_count: int
    storage_cleanup_pending: bool = strawberry.field(
        description="true when storage could not be cleaned now; the objects are recorded "
        "and removed by the cleanup job"
    )


@strawberry.input
class CreateAnnotationInput:
    study_instance_uid: str
    series_instance_uid: str | None = None
    label: str | None = None


@strawberry.input
class CreateMaskGroupInput:
    annotation_id: strawberry.ID
    group_name: str | None = None
    model_name: str | None = None
    version: str | None = None
    modality: str | None = None
    slice_count: int = 1
    mask_type: str = "segmentation"
    description: str | None = None
    confidence: float | None = strawberry.field(
        default=None, description="model's overall confidence for this result, 0..1"
    )
    inference_parameters: JSON | None = strawberry.field(
        default=None, description="free-form inference parameters (checkpoint, thresholds, ...)"
    )


@strawberry.input
class SliceUploadInput:
    slice_index: int
    label_name: str | None = None
    content_type: str = "image/png"
    file_size: BigInt = strawberry.field(
        description="exact size in bytes of the file that will be PUT"
    )
    content_md5: str = strawberry.field(
        description="MD5 digest of the file, base64 as in the Content-MD5 header (RFC 1864). "
        "It is signed into the upload so that storage refuses a different body, and checked "
        "again on completion."
    )


@strawberry.input
class CompletedSliceInput:
    slice_index: int
    label_name: str | None = None
    sop_instance_uid: str | None = None
    width: int | None = None
    height: int | None = None
    confidence: float | None = strawberry.field(
        default=None, description="the model's confidence in this slice, 0..1"
    )


def _build_plain_input(cls: type[Any]) -> None:
    """Builds instances of an input type whose fields are all scalars straight from
    graphql-core's coerced value, through Strawberry's documented `from_input` hook.

    Strawberry's generic conversion costs ~150 µs per object; a batch of 5000 slices would
    spend most of its time there. graphql-core has already validated and coerced every
    value (and filled in the published defaults), so only the names need mapping."""
    definition = cls.__strawberry_definition__
    converter = NameConverter()
    names: list[tuple[str, str, Any]] = []
    for field in definition.fields:
        field_type = field.type
        if isinstance(field_type, StrawberryOptional):
            field_type = field_type.of_type
        if field_type not in LEAF_TYPES:
            raise TypeError(f"{cls.__name__}.{field.python_name} is not a scalar field")
        default = None if field.default is dataclasses.MISSING else field.default
        names.append((converter.from_field(field), field.python_name, default))

    def from_input(target: type[Any], value: Mapping[str, Any], context: Any) -> Any:
        return target(**{python: value.get(graphql, default) for graphql, python, default in names})

    definition.from_input = from_input


LEAF_TYPES = (int, str, float, bool, BigInt, strawberry.ID)
_build_plain_input(SliceUploadInput)
_build_plain_input(CompletedSliceInput)
