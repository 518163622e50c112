from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, NewType, TypeVar

import strawberry
from strawberry.scalars import JSON
from strawberry.schema.name_converter import NameConverter
from strawberry.types.base import StrawberryOptional
from strawberry.types.private import is_private
from strawberry.types.scalar import ScalarDefinition

from app.errors import BadUserInput
from app.graphql.collector import collector_paused
from app.graphql.context import Context, Info
from app.graphql.execution import ARGUMENT_GETTER
from app.graphql.group_validation import ValidationReport
from app.graphql.loaders import MaskFilter
from app.graphql.rows import FromRow
from app.graphql.selections import needed_columns, selected_names
from app.models import utcnow
from app.principals import Role
from app.storage import SignedRequest, Storage, signing_time
from app.upload_urls import UploadTarget
from app.validation import check_page, signed_url_ttl
from app.view_urls import ViewUrlSigner

DomainT = TypeVar("DomainT")


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


# Registers the domain enum with GraphQL in place; fields use Role itself.
strawberry.enum(
    Role,
    name="Role",
    description="READER: queries, views and downloads. UPLOADER: READER + create annotations "
    "and groups, upload, complete, delete own groups. ADMIN: everything, including the audit "
    "log and any group.",
)


@strawberry.type
class Principal:
    user: str
    role: Role


def fields_of(source: Any, **overrides: Any) -> dict[str, Any]:
    """The fields of a GraphQL input as keyword arguments for a domain function."""
    values = {field.name: getattr(source, field.name) for field in dataclasses.fields(source)}
    return {**values, **overrides}


def to_domain_list(cls: Callable[..., DomainT], sources: Iterable[Any]) -> list[DomainT]:
    names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return [cls(**{name: getattr(source, name) for name in names}) for source in sources]


@strawberry.type
class AuditEvent(FromRow):
    id: strawberry.ID
    occurred_at: datetime
    actor: str
    action: str = strawberry.field(
        description="annotation.create, mask_group.create, upload_urls.issue, upload.complete, "
        "mask_group.delete, mask_group.validate, token.create, token.revoke, "
        "mask_group.export_seg, mask_group.import_seg"
    )
    annotation_id: strawberry.ID | None
    mask_group_id: strawberry.ID | None
    slice_count: int | None
    byte_count: BigInt | None
    request_id: str | None
    client_ip: str | None
    user_agent: str | None
    detail: JSON | None


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


@strawberry.type
class Annotation(FromRow):
    id: strawberry.ID
    study_instance_uid: str
    series_instance_uid: str | None
    label: str | None
    created_by: str | None
    created_at: datetime

    @strawberry.field
    async def mask_groups(self, info: Info) -> list[MaskGroup]:
        rows = await info.context.loaders.groups_of_annotation.load(int(self.id))
        return [MaskGroup.from_row(row) for row in rows]


@strawberry.enum
class DicomExportStatus(enum.Enum):
    PENDING = strawberry.enum_value("PENDING", description="requested, not yet claimed")
    RUNNING = strawberry.enum_value("RUNNING", description="a worker is building or storing it")
    DONE = strawberry.enum_value("DONE", description="stored in the PACS and listed by it")
    FAILED = strawberry.enum_value("FAILED", description="see error; asking again retries")


@strawberry.type
class DicomExport(FromRow):
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


@strawberry.type
class MaskGroup(FromRow):
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

    @strawberry.field
    async def annotation(self, info: Info) -> Annotation:
        row = await info.context.loaders.annotation.load(int(self.annotation_id))
        return Annotation.from_row(row)

    @strawberry.field(description="latest validation, null until the group has been validated")
    async def validation(self, info: Info) -> ValidationReport | None:
        report = await info.context.loaders.validation_of_group.load(int(self.id))
        return ValidationReport.from_report(report) if report is not None else None

    @strawberry.field(description="latest DICOM SEG export of this group; null if never exported")
    async def dicom_export(self, info: Info) -> DicomExport | None:
        row = await info.context.loaders.dicom_export.load(int(self.id))
        return DicomExport.from_row(row) if row is not None else None

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
        check_page(limit, offset)
        columns = needed_columns(selected_names(info.selected_fields), mask_columns())
        mask_filter = MaskFilter(
            slice_index_from, slice_index_to, label_name, limit, offset, columns
        )
        rows = await (await info.context.loaders.masks_of_group.load((int(self.id), mask_filter)))
        view_urls = info.context.view_urls
        with collector_paused():
            masks = Mask.from_rows(
                rows,
                view_urls=view_urls,
                view_expires=view_urls.current_expiry(),
                signed_at=utcnow(),
            )
        rows.clear()  # ours alone (see Loaders.masks_of_group): freed group by group
        return masks


def _download_url_getter(
    context: Context, arguments: dict[str, Any]
) -> Callable[[Mask], SignedUrl] | None:
    """Mask.download_url for a whole list (see app.graphql.execution): the TTL checked once,
    not once per mask; one the resolver refuses is left to it, to report as it does."""
    try:
        ttl = signed_url_ttl(context.settings, arguments.get("ttlSeconds"))
    except BadUserInput:
        return None
    storage = context.storage
    return lambda mask: mask.signed_get(storage, ttl)


@strawberry.type
class Mask(FromRow):
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
    view_urls: strawberry.Private[ViewUrlSigner | None] = None
    # One expiry for a whole list: the clock is read once, not once per mask.
    view_expires: strawberry.Private[int | None] = None

    @classmethod
    def with_view_urls(cls, row: Any, view_urls: ViewUrlSigner, expires: int | None = None) -> Mask:
        mask = cls.from_row(row)
        mask.view_urls = view_urls
        mask.view_expires = expires
        return mask

    # One signing time for a whole list as well: its GETs share what that time makes.
    signed_at: strawberry.Private[datetime | None] = None

    def signed_get(self, storage: Storage, ttl: int) -> SignedUrl:
        now = signing_time(utcnow() if self.signed_at is None else self.signed_at, ttl)
        return SignedUrl.from_request(storage.presign_get(self.file_path, expires_in=ttl, now=now))

    @strawberry.field(
        description="presigned GET for the stored object",
        metadata={ARGUMENT_GETTER: _download_url_getter},
    )
    def download_url(self, info: Info, ttl_seconds: int | None = None) -> SignedUrl:
        return self.signed_get(
            info.context.storage, signed_url_ttl(info.context.settings, ttl_seconds)
        )

    @strawberry.field(
        description="same-origin path that streams the image through the server: "
        "/api/mask-group/{groupId}/view?slice=N[&label=L]&expires=E&signature=S, signed for "
        "VIEW_URL_TTL seconds so that an <img> loads it without an Authorization header"
    )
    def view_url(self) -> str:
        if self.view_urls is None:
            raise TypeError("Mask built without Mask.with_view_urls")
        expires = self.view_expires
        return self.view_urls.url(
            self.mask_group_id,
            self.slice_index,
            self.label_name,
            self.view_urls.current_expiry() if expires is None else expires,
        )


# The columns each resolver field of Mask reads (its plain fields read their own).
MASK_RESOLVER_COLUMNS = {
    "download_url": ("file_path",),
    "view_url": ("mask_group_id", "slice_index", "label_name"),
}


@functools.cache
def mask_columns() -> dict[str, tuple[str, ...]]:
    """Mask's GraphQL field names and the columns they read; a resolver field not in
    MASK_RESOLVER_COLUMNS is left out, so selecting it loads every column."""
    converter = NameConverter()
    columns: dict[str, tuple[str, ...]] = {}
    for field in Mask.__strawberry_definition__.fields:  # type: ignore[attr-defined]
        if is_private(field.type):
            continue
        if field.base_resolver is None:
            columns[converter.from_field(field)] = (field.python_name,)
        elif field.python_name in MASK_RESOLVER_COLUMNS:
            columns[converter.from_field(field)] = MASK_RESOLVER_COLUMNS[field.python_name]
    return columns


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
        description="true while anything is still to be swept from storage: it could not be "
        "cleaned now, or an upload URL issued before the delete is still valid; the storage "
        "sweeper finishes it"
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
class CompletedSliceInput:
    slice_index: int
    label_name: str | None = None
    sop_instance_uid: str | None = None
    width: int | None = None
    height: int | None = None
    confidence: float | None = strawberry.field(
        default=None, description="the model's confidence in this slice, 0..1"
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
