"""A DICOM SEG as a new mask group: one PNG per source slice and segment.

The PNGs take the same path as any client's: presigned PUT URLs from
`upload_urls.request_upload_urls`, a PUT to storage, `completion.complete_mask_upload` verifying size and
MD5 in storage. Slices go in batches (bounded memory: a batch of planes is decoded, encoded
and uploaded before the next). If anything fails the new group is deleted again (rows and
objects), so an import lands whole or not at all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.annotations import create_mask_group
from app.audit import Actor, record
from app.completion import CompletedSlice, complete_mask_upload
from app.config import Settings
from app.db import transaction
from app.deletion import delete_mask_group, purge, settle_purge
from app.dicom.errors import DicomMismatch
from app.dicom.pacs import Pacs
from app.dicom.seg import (
    SegSegment,
    check_fits,
    iter_planes,
    read_segments,
    referenced_series,
)
from app.dicom.source import SourceSeries, read_source_dir
from app.errors import BadUserInput, NotFound, StorageUnavailable
from app.models import Annotation, MaskGroup, utcnow
from app.principals import Role, require
from app.storage import Storage
from app.upload_urls import SliceUpload, UploadTarget, request_upload_urls
from app.validation import validate_uid

logger = logging.getLogger(__name__)

# Source slices per batch of uploads (each batch: one URL request, PUTs, one completion).
BATCH_SLICES = 128
PUT_CONCURRENCY = 16
PUT_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class _Png:
    slice_index: int
    label_name: str
    sop_instance_uid: str
    body: bytes


def encode_png(plane: np.ndarray[Any, Any]) -> bytes:
    """A 1-bit PNG: what a binary segment needs, and the smallest lossless form."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(plane, dtype=np.bool_)).save(buffer, format="PNG")
    return buffer.getvalue()


def _segmentation(dataset: Dataset, sop_instance_uid: str) -> hd.seg.Segmentation:
    if dataset.get("SOPClassUID") != SegmentationStorage:
        raise DicomMismatch(f"instance {sop_instance_uid} is not a DICOM Segmentation (SEG)")
    try:
        return hd.seg.Segmentation.from_dataset(dataset, copy=False)
    except (AttributeError, ValueError, KeyError) as error:
        raise DicomMismatch(f"SEG {sop_instance_uid} cannot be read: {error}") from error


def _model(seg: hd.seg.Segmentation) -> tuple[str | None, str | None]:
    for item in seg.SegmentSequence:
        for algorithm in item.get("SegmentationAlgorithmIdentificationSequence", []):
            return str(algorithm.AlgorithmName), str(algorithm.AlgorithmVersion)
    return None, None


def _encode_batch(
    planes: list[tuple[int, list[np.ndarray[Any, Any]]]],
    source: SourceSeries,
    segments: Sequence[SegSegment],
) -> list[_Png]:
    return [
        _Png(
            slice_index=position,
            label_name=segment.label_name,
            sop_instance_uid=str(source.datasets[position].SOPInstanceUID),
            body=encode_png(plane),
        )
        for position, per_segment in planes
        for segment, plane in zip(segments, per_segment, strict=True)
    ]


async def _upload_batch(
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    settings: Settings,
    actor: Actor,
    client: httpx.AsyncClient,
    group_id: int,
    pngs: Sequence[_Png],
    source: SourceSeries,
) -> None:
    uploader = (storage, settings, actor)
    async with transaction(sessionmaker) as session:
        targets = await request_upload_urls(
            session,
            *uploader,
            group_id=group_id,
            slices=[
                SliceUpload(
                    slice_index=png.slice_index,
                    label_name=png.label_name,
                    content_type="image/png",
                    file_size=len(png.body),
                    content_md5=base64.b64encode(hashlib.md5(png.body).digest()).decode(),
                )
                for png in pngs
            ],
            ttl_seconds=None,
            now=utcnow(),
        )
    gate = asyncio.Semaphore(PUT_CONCURRENCY)

    async def put(target: UploadTarget, body: bytes) -> None:
        async with gate:
            try:
                response = await client.request(
                    target.request.method,
                    target.request.url,
                    content=body,
                    headers=dict(target.request.headers),
                )
            except httpx.HTTPError as error:
                raise StorageUnavailable(f"storage refused an imported mask: {error}") from error
        if response.status_code >= 300:
            raise StorageUnavailable(
                f"storage answered HTTP {response.status_code} to an imported mask's upload"
            )

    await asyncio.gather(
        *(put(target, png.body) for target, png in zip(targets, pngs, strict=True))
    )
    await complete_mask_upload(
        sessionmaker,
        *uploader,
        group_id=group_id,
        slices=[
            CompletedSlice(
                slice_index=png.slice_index,
                label_name=png.label_name,
                sop_instance_uid=png.sop_instance_uid,
                width=source.columns,
                height=source.rows,
            )
            for png in pngs
        ],
        now=utcnow(),
    )


async def import_seg(
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    settings: Settings,
    actor: Actor,
    *,
    annotation_id: int,
    series_instance_uid: str,
    sop_instance_uid: str,
    dataset: Dataset | None = None,
    source_dir: Path | None = None,
) -> MaskGroup:
    """A new group of the annotation from the SEG (`dataset`, else retrieved by WADO-RS)."""
    require(actor.principal, Role.UPLOADER)
    validate_uid("seriesInstanceUid", series_instance_uid, required=True)
    validate_uid("sopInstanceUid", sop_instance_uid, required=True)
    # The PACS first: without one configured, say so before anything else.
    pacs = Pacs(settings) if dataset is None or source_dir is None else None
    try:
        return await _import(
            sessionmaker,
            storage,
            settings,
            actor,
            pacs,
            annotation_id=annotation_id,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
            dataset=dataset,
            source_dir=source_dir,
        )
    finally:
        if pacs is not None:
            pacs.close()


async def _import(
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    settings: Settings,
    actor: Actor,
    pacs: Pacs | None,
    *,
    annotation_id: int,
    series_instance_uid: str,
    sop_instance_uid: str,
    dataset: Dataset | None,
    source_dir: Path | None,
) -> MaskGroup:
    async with sessionmaker() as session:
        annotation = await session.scalar(select(Annotation).where(Annotation.id == annotation_id))
    if annotation is None:
        raise NotFound(f"annotation {annotation_id} does not exist", field="annotationId")
    if annotation.series_instance_uid is None:
        raise BadUserInput(
            f"annotation {annotation_id} names no seriesInstanceUid: the SEG's source series "
            "is unknown",
            field="annotationId",
        )
    study, source_series = annotation.study_instance_uid, annotation.series_instance_uid
    if dataset is None:
        assert pacs is not None
        dataset = await pacs.retrieve_instance(study, series_instance_uid, sop_instance_uid)
    # highdicom keeps a SEG's frame index in an SQLite database bound to the thread that
    # read it: every call on the SEG runs in this one thread.
    with ThreadPoolExecutor(1, thread_name_prefix="seg-import") as seg_thread:
        return await _import_seg(
            sessionmaker,
            storage,
            settings,
            actor,
            pacs,
            seg_thread,
            annotation_id=annotation_id,
            dataset=dataset,
            sop_instance_uid=sop_instance_uid,
            study=study,
            source_series=source_series,
            source_dir=source_dir,
        )


async def _import_seg(
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    settings: Settings,
    actor: Actor,
    pacs: Pacs | None,
    seg_thread: ThreadPoolExecutor,
    *,
    annotation_id: int,
    dataset: Dataset,
    sop_instance_uid: str,
    study: str,
    source_series: str,
    source_dir: Path | None,
) -> MaskGroup:
    loop = asyncio.get_running_loop()
    seg = await loop.run_in_executor(seg_thread, _segmentation, dataset, sop_instance_uid)
    referenced = referenced_series(seg)
    if referenced != source_series:
        raise DicomMismatch(
            f"SEG {sop_instance_uid} segments series {referenced}, but annotation "
            f"{annotation_id} is about series {source_series}"
        )
    if source_dir is not None:
        source = await asyncio.to_thread(read_source_dir, source_dir, study, source_series)
    else:
        assert pacs is not None
        source = await pacs.source_series(study, source_series)
    await loop.run_in_executor(seg_thread, check_fits, seg, source)
    return await _create_group(
        sessionmaker,
        storage,
        settings,
        actor,
        seg_thread,
        annotation_id,
        seg,
        source,
        sop_instance_uid,
    )


async def _create_group(
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    settings: Settings,
    actor: Actor,
    seg_thread: ThreadPoolExecutor,
    annotation_id: int,
    seg: hd.seg.Segmentation,
    source: SourceSeries,
    sop_instance_uid: str,
) -> MaskGroup:
    segments = read_segments(seg)
    model_name, version = _model(seg)
    async with transaction(sessionmaker) as session:
        group = await create_mask_group(
            session,
            settings,
            actor,
            annotation_id=annotation_id,
            group_name=str(seg.get("SeriesDescription", "") or "")[:256] or None,
            model_name=model_name,
            version=version,
            modality=str(source.datasets[0].get("Modality", "") or "") or None,
            slice_count=len(source),
            mask_type="segmentation",
            description=f"imported from DICOM SEG {sop_instance_uid}",
            confidence=None,
            inference_parameters=None,
        )
        await record(
            session,
            actor,
            "mask_group.import_seg",
            annotation_id=annotation_id,
            mask_group_id=group.id,
            detail={"sopInstanceUid": sop_instance_uid, "segments": len(segments)},
        )
    group_id = group.id
    batch = max(1, min(BATCH_SLICES, settings.max_slices_per_call // max(1, len(segments))))
    try:
        async with httpx.AsyncClient(timeout=PUT_TIMEOUT_SECONDS) as client:
            planes = iter_planes(seg, source, segments)
            loop = asyncio.get_running_loop()
            while chunk := await loop.run_in_executor(
                seg_thread, lambda: list(itertools.islice(planes, batch))
            ):
                pngs = await asyncio.to_thread(_encode_batch, chunk, source, segments)
                await _upload_batch(
                    sessionmaker, storage, settings, actor, client, group_id, pngs, source
                )
    except BaseException as error:
        await _discard(sessionmaker, storage, actor, group_id)
        if isinstance(error, ValueError):
            # highdicom's word for frames that do not fit their references.
            raise DicomMismatch(f"the SEG's frames cannot be read: {error}") from error
        raise
    async with sessionmaker() as session:
        imported = await session.scalar(select(MaskGroup).where(MaskGroup.id == group_id))
    assert imported is not None
    return imported


async def _discard(
    sessionmaker: async_sessionmaker[AsyncSession], storage: Storage, actor: Actor, group_id: int
) -> None:
    try:
        async with transaction(sessionmaker) as session:
            deletion = await delete_mask_group(session, actor, group_id=group_id, now=utcnow())
        outcome = await purge(storage, deletion)
        async with transaction(sessionmaker) as session:
            await settle_purge(session, deletion, outcome, now=utcnow())
    except Exception:
        logger.exception("import: the partial group %s could not be removed", group_id)
