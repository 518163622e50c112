"""Uploading one mask group: windows of slices are encoded (in a worker thread), given URLs
just before their PUTs, PUT in parallel, and completed in batches while the next window goes.

- A URL is never used near its expiry: before each PUT the window's remaining URLs are
  renewed in one request when they are within a margin of expiring, and a 400/403 expiry
  answer from storage renews them too.
- Network errors and 5xx from storage are retried with exponential backoff and full jitter;
  a retried PUT re-checks its URL first, so a long backoff never ends on a stale signature.
- Memory holds a few windows of encoded slices at most, whatever the volume's size.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from app.client.api import PacsMasksClient, UploadTarget
from app.client.errors import BadInput, ClientError, StorageRefused, TransportFailure
from app.client.sources import EncodedSlice, Manifest, SliceSet, SliceSource

DEFAULT_CONCURRENCY = 16
DEFAULT_BATCH_SIZE = 200
# Renewals of one slice's URL before we conclude storage refuses it for another reason.
MAX_RENEWALS = 5


@dataclass(frozen=True, slots=True)
class UploadRequest:
    annotation_id: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    annotation_label: str | None = None
    group_name: str | None = None
    model_name: str | None = None
    version: str | None = None
    modality: str | None = None
    description: str | None = None
    mask_type: str = "segmentation"
    confidence: float | None = None
    inference_parameters: dict[str, Any] | None = None
    resume_group_id: str | None = None


METADATA_FIELDS = {
    "annotationId": "annotation_id",
    "studyInstanceUid": "study_instance_uid",
    "seriesInstanceUid": "series_instance_uid",
    "groupName": "group_name",
    "modelName": "model_name",
    "version": "version",
    "modality": "modality",
    "description": "description",
    "confidence": "confidence",
}


def request_from_metadata(metadata: dict[str, Any], **explicit: Any) -> UploadRequest:
    """A request from a JSON manifest's top-level fields; `explicit` values (command-line
    flags) win where they are given, and inference parameters are merged."""
    values: dict[str, Any] = {}
    for key, name in METADATA_FIELDS.items():
        value = metadata.get(key)
        if value is not None and not isinstance(value, str | int | float):
            raise BadInput(f"manifest field {key} must be a string or a number")
        values[name] = value
    values["annotation_id"] = (
        str(values["annotation_id"]) if values["annotation_id"] is not None else None
    )
    parameters = metadata.get("inferenceParameters") or {}
    if not isinstance(parameters, dict):
        raise BadInput("manifest field inferenceParameters must be an object")
    parameters = {**parameters, **(explicit.pop("inference_parameters", None) or {})}
    values.update({name: value for name, value in explicit.items() if value is not None})
    confidence = values.get("confidence")
    if confidence is not None and (
        not isinstance(confidence, int | float) or not 0.0 <= confidence <= 1.0
    ):
        raise BadInput(f"confidence {confidence} is not between 0 and 1")
    return UploadRequest(**values, inference_parameters=parameters or None)


@dataclass(slots=True)
class UploadResult:
    group_id: str
    annotation_id: str
    slice_count: int
    status: str
    uploaded_slices: int = 0
    skipped_slices: int = 0
    uploaded_bytes: int = 0
    seconds: float = 0.0
    missing_slice_indexes: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "groupId": self.group_id,
            "annotationId": self.annotation_id,
            "sliceCount": self.slice_count,
            "status": self.status,
            "uploadedSlices": self.uploaded_slices,
            "skippedSlices": self.skipped_slices,
            "uploadedBytes": self.uploaded_bytes,
            "seconds": round(self.seconds, 3),
            "missingSliceIndexes": self.missing_slice_indexes,
        }


class Progress(Protocol):
    def started(self, group_id: str, total_slices: int) -> None: ...

    def advanced(self, slices: int, nbytes: int) -> None: ...


class _Item:
    __slots__ = ("body", "height", "label_name", "md5", "size", "slice_index", "width")

    def __init__(self, source: SliceSource, encoded: EncodedSlice) -> None:
        self.slice_index = source.slice_index
        self.label_name = source.label_name
        self.body: bytes | None = encoded.body
        self.size = len(encoded.body)
        self.md5 = encoded.content_md5
        self.width = encoded.width
        self.height = encoded.height

    @property
    def key(self) -> tuple[int, str | None]:
        return (self.slice_index, self.label_name)

    def declaration(self) -> dict[str, Any]:
        return {
            "sliceIndex": self.slice_index,
            "labelName": self.label_name,
            "contentType": "image/png",
            "fileSize": self.size,
            "contentMd5": self.md5,
        }


class _Window:
    def __init__(self, upload: GroupUpload, items: list[_Item]) -> None:
        self.upload = upload
        self.items = items
        self.remaining = len(items)
        self.done: set[tuple[int, str | None]] = set()
        self.targets: dict[tuple[int, str | None], UploadTarget] = {}
        self.lock = asyncio.Lock()

    async def renew(self) -> None:
        pending = [item for item in self.items if item.key not in self.done]
        targets = await self.upload.client.request_upload_urls(
            self.upload.group_id, [item.declaration() for item in pending], self.upload.ttl_seconds
        )
        self.targets.update({(target.slice_index, target.label_name): target for target in targets})

    async def target(self, item: _Item, stale: UploadTarget | None = None) -> UploadTarget:
        async with self.lock:
            current = self.targets[item.key]
            lifetime = current.deadline - current.issued_at
            margin = min(30.0, lifetime / 4)
            if current is stale or current.deadline - time.monotonic() < margin:
                await self.renew()
            return self.targets[item.key]


class GroupUpload:
    def __init__(
        self,
        client: PacsMasksClient,
        group_id: str,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        batch_size: int = DEFAULT_BATCH_SIZE,
        ttl_seconds: int | None = None,
        manifest: Manifest | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.client = client
        self.group_id = group_id
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.ttl_seconds = ttl_seconds
        self.manifest = manifest or Manifest()
        self.progress = progress
        self.uploaded_slices = 0
        self.uploaded_bytes = 0
        self.group: dict[str, Any] | None = None

    async def run(self, sources: Iterator[SliceSource]) -> None:
        windows: asyncio.Queue[_Window | None] = asyncio.Queue(maxsize=1)
        jobs: asyncio.Queue[tuple[_Window, _Item] | None] = asyncio.Queue(self.concurrency)
        completions: asyncio.Queue[_Window | None] = asyncio.Queue()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._prepare(sources, windows))
                completer = tasks.create_task(self._complete(completions))
                workers = [
                    tasks.create_task(self._work(jobs, completions))
                    for _ in range(self.concurrency)
                ]
                while (window := await windows.get()) is not None:
                    # URLs are asked for only now, when the window's PUTs are about to start.
                    await window.renew()
                    for item in window.items:
                        await jobs.put((window, item))
                for _ in workers:
                    await jobs.put(None)
                await asyncio.gather(*workers)
                await completions.put(None)
                await completer
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    async def _prepare(self, sources: Iterator[SliceSource], windows: asyncio.Queue[Any]) -> None:
        while True:
            chunk = list(itertools.islice(sources, self.batch_size))
            if not chunk:
                break
            # Reading and PNG encoding are CPU and disk work: off the event loop.
            items = await asyncio.to_thread(_encode, chunk)
            await windows.put(_Window(self, items))
        await windows.put(None)

    async def _work(
        self,
        jobs: asyncio.Queue[tuple[_Window, _Item] | None],
        completions: asyncio.Queue[_Window | None],
    ) -> None:
        while (job := await jobs.get()) is not None:
            window, item = job
            await self._put(window, item)
            window.done.add(item.key)
            self.uploaded_slices += 1
            self.uploaded_bytes += item.size
            if self.progress is not None:
                self.progress.advanced(1, item.size)
            item.body = None
            window.remaining -= 1
            if window.remaining == 0:
                await completions.put(window)

    async def _put(self, window: _Window, item: _Item) -> None:
        retry = self.client.retry
        attempt = 0
        renewals = 0
        target = await window.target(item)
        while True:
            try:
                response = await self.client.http.request(
                    target.method, target.url, content=item.body, headers=target.headers
                )
            except httpx.TransportError as error:
                if attempt + 1 >= retry.attempts:
                    raise TransportFailure(
                        f"storage unreachable for slice {item.slice_index}: "
                        f"{type(error).__name__} {error}".strip()
                    ) from error
            else:
                status = response.status_code
                if status < 300:
                    return
                if status in (400, 403) and _expired(response, target):
                    renewals += 1
                    if renewals > MAX_RENEWALS:
                        raise StorageRefused(
                            f"storage keeps refusing fresh URLs for slice {item.slice_index}"
                        )
                    target = await window.target(item, stale=target)
                    continue
                if status not in (429, 500, 502, 503, 504):
                    raise StorageRefused(
                        f"storage refused slice {item.slice_index}: HTTP {status} "
                        f"{response.text[:200]}"
                    )
                if attempt + 1 >= retry.attempts:
                    raise TransportFailure(
                        f"storage answered HTTP {status} for slice {item.slice_index} "
                        f"{attempt + 1} times"
                    )
            await asyncio.sleep(retry.delay(attempt))
            attempt += 1
            target = await window.target(item)

    async def _complete(self, completions: asyncio.Queue[_Window | None]) -> None:
        while (window := await completions.get()) is not None:
            slices = []
            for item in window.items:
                completed: dict[str, Any] = {
                    "sliceIndex": item.slice_index,
                    "labelName": item.label_name,
                    "width": item.width,
                    "height": item.height,
                }
                meta = self.manifest.slices.get(item.slice_index)
                if meta is not None and meta.sop_instance_uid is not None:
                    completed["sopInstanceUid"] = meta.sop_instance_uid
                if meta is not None and meta.confidence is not None:
                    completed["confidence"] = meta.confidence
                slices.append(completed)
            self.group = await self.client.complete_upload(self.group_id, slices)


def _encode(chunk: list[SliceSource]) -> list[_Item]:
    return [_Item(source, source.load()) for source in chunk]


def _expired(response: httpx.Response, target: UploadTarget) -> bool:
    return time.monotonic() >= target.deadline - 1.0 or b"expired" in response.content.lower()


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    for error in leaves:
        if isinstance(error, ClientError):
            return error
    return leaves[0]


def _group_fields(
    request: UploadRequest, slice_set: SliceSet, annotation_id: str
) -> dict[str, Any]:
    return {
        "annotationId": annotation_id,
        "sliceCount": slice_set.slice_count,
        "groupName": request.group_name or slice_set.name,
        "modelName": request.model_name,
        "version": request.version,
        "modality": request.modality,
        "description": request.description,
        "maskType": request.mask_type,
        "confidence": request.confidence,
        "inferenceParameters": request.inference_parameters,
    }


async def upload(
    client: PacsMasksClient,
    request: UploadRequest,
    slice_set: SliceSet,
    *,
    manifest: Manifest | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    batch_size: int = DEFAULT_BATCH_SIZE,
    ttl_seconds: int | None = None,
    progress: Progress | None = None,
) -> UploadResult:
    """Create (or, with `resume_group_id`, continue) a mask group and upload its slices."""
    started = time.monotonic()
    sources = slice_set.slices()
    skipped = 0
    if request.resume_group_id is not None:
        group = await client.mask_group(request.resume_group_id, with_masks=True)
        if group is None:
            raise BadInput(f"mask group {request.resume_group_id} does not exist")
        if group["sliceCount"] != slice_set.slice_count:
            raise BadInput(
                f"mask group {group['id']} has {group['sliceCount']} slices, "
                f"the input has {slice_set.slice_count}: not the same result"
            )
        registered = {(mask["sliceIndex"], mask["labelName"]) for mask in group.pop("masks")}
        skipped = len(registered)
        sources = (
            source
            for source in sources
            if (source.slice_index, source.label_name) not in registered
        )
    else:
        annotation_id = request.annotation_id
        if annotation_id is None:
            if request.study_instance_uid is None:
                raise BadInput("name the annotation: an annotation id or a Study Instance UID")
            annotation_id = await client.find_or_create_annotation(
                request.study_instance_uid, request.series_instance_uid, request.annotation_label
            )
        group = await client.create_mask_group(_group_fields(request, slice_set, annotation_id))
    group_id = str(group["id"])
    if progress is not None:
        progress.started(group_id, max(slice_set.total - skipped, 0))
    engine = GroupUpload(
        client,
        group_id,
        concurrency=concurrency,
        batch_size=batch_size,
        ttl_seconds=ttl_seconds,
        manifest=manifest,
        progress=progress,
    )
    await engine.run(sources)
    final = await client.mask_group(group_id)
    assert final is not None
    return UploadResult(
        group_id=group_id,
        annotation_id=str(final["annotationId"]),
        slice_count=final["sliceCount"],
        status=final["status"],
        uploaded_slices=engine.uploaded_slices,
        skipped_slices=skipped,
        uploaded_bytes=engine.uploaded_bytes,
        seconds=time.monotonic() - started,
        missing_slice_indexes=final["missingSliceIndexes"],
    )
