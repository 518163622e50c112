"""Mask groups as DICOM Segmentation (SEG) instances, built and read with highdicom.

Building: each mask is matched to its source instance (by sopInstanceUid when the mask has
one, else by sliceIndex along the series geometry, see app/dicom/source.py), its PNG is
streamed from storage and decoded straight into one mask volume of the slices that have
masks (app/dicom/seg_volume.py): a label map, one byte per voxel, that highdicom encodes as
a BINARY SEG, one segment per label, frames only where a segment is non-empty. If two labels
overlap on a pixel, the same buffer becomes bit flags (still one byte per voxel up to eight
labels); highdicom then builds the SEG from a stand-in with the same frames and the frames'
bits are packed from the flags, since highdicom's own input for overlapping segments costs
9 bytes per voxel plus one per segment. Either way the export holds one volume plus the
packed frames (twice while they are joined): about two label volumes at its peak.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version as package_version
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app.dicom.errors import DicomMismatch
from app.dicom.refs import GroupInfo, MaskRef, SegSummary
from app.dicom.seg_volume import MaskVolume, pack_overlapping_frames
from app.dicom.source import SourceSeries
from app.storage import LABEL_PATTERN, Storage, StorageError

MANUFACTURER = "pacs-masks"
# Masks are fetched from storage this many at a time (bounded memory, hidden latency).
FETCH_CONCURRENCY = 16
SEG_SERIES_NUMBER = 9000
UNLABELLED_SEGMENT = "mask"


def segment_label(group: GroupInfo, label_name: str | None) -> str:
    if label_name:
        return label_name
    return group.group_name or group.model_name or UNLABELLED_SEGMENT


def _positions(group: GroupInfo, masks: Sequence[MaskRef], source: SourceSeries) -> list[int]:
    """The source position of each mask; refuses in words what does not fit."""
    if any(mask.sop_instance_uid is None for mask in masks) and group.slice_count != len(source):
        raise DicomMismatch(
            f"the group has {group.slice_count} slices but source series "
            f"{source.series_instance_uid} has {len(source)} instances, and not every mask "
            "names its sopInstanceUid: slices cannot be matched"
        )
    positions: list[int] = []
    for mask in masks:
        if mask.sop_instance_uid is not None:
            position = source.index_by_sop.get(mask.sop_instance_uid)
            if position is None:
                raise DicomMismatch(
                    f"slice {mask.slice_index}: sopInstanceUid {mask.sop_instance_uid} is not "
                    f"an instance of source series {source.series_instance_uid}"
                )
        else:
            position = mask.slice_index
        positions.append(position)
    return positions


def decode_mask(data: bytes, where: str, rows: int, columns: int) -> np.ndarray[Any, Any]:
    """A PNG (1-bit, or 8-bit with 0 and one other value) as a boolean plane."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image: Image.Image = opened
            if image.mode not in ("1", "L", "P", "I", "I;16"):
                image = image.convert("L")
            pixels: np.ndarray[Any, Any] = np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DicomMismatch(f"{where} is not a readable image: {error}") from error
    if pixels.shape != (rows, columns):
        height, width = pixels.shape[:2]
        raise DicomMismatch(
            f"{where} is {width}x{height} but its source instance is {columns}x{rows}"
        )
    if pixels.dtype == np.bool_:
        return pixels
    top = pixels.max()
    mask: np.ndarray[Any, Any] = pixels != 0
    if top and np.count_nonzero(pixels == top) != np.count_nonzero(mask):
        raise DicomMismatch(
            f"{where} has more than two pixel values: a BINARY SEG needs 0 and one other value"
        )
    return mask


async def _read(storage: Storage, key: str, where: str) -> bytes:
    try:
        stream = await storage.open(key)
    except StorageError as error:
        raise StorageError(f"{where}: storage could not be read: {error}") from error
    if stream is None:
        raise DicomMismatch(f"{where}: its object {key} is missing from storage")
    return b"".join([chunk async for chunk in stream.chunks])


def _where(mask: MaskRef) -> str:
    label = f" ({mask.label_name})" if mask.label_name else ""
    return f"slice {mask.slice_index}{label}"


async def _decode_all(
    storage: Storage,
    masks: Sequence[MaskRef],
    frames: Sequence[int],
    segments: Sequence[int],
    volume: MaskVolume,
    source: SourceSeries,
) -> None:
    gate = asyncio.Semaphore(FETCH_CONCURRENCY)

    def decode_into(data: bytes, where: str, frame: int, segment: int) -> None:
        volume.add(frame, segment, decode_mask(data, where, source.rows, source.columns))

    async def one(mask: MaskRef, frame: int, segment: int) -> None:
        where = _where(mask)
        async with gate:
            data = await _read(storage, mask.file_path, where)
            # Decoding and writing into the volume stay off the event loop.
            await asyncio.to_thread(decode_into, data, where, frame, segment)

    tasks = [
        asyncio.ensure_future(one(mask, frame, segment))
        for mask, frame, segment in zip(masks, frames, segments, strict=True)
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _segment_descriptions(
    group: GroupInfo, labels: Sequence[str]
) -> list[hd.seg.SegmentDescription]:
    automatic = bool(group.model_name)
    algorithm = (
        hd.AlgorithmIdentificationSequence(
            name=group.model_name or "",
            version=group.version or "unknown",
            family=codes.cid7162.ArtificialIntelligence,
        )
        if automatic
        else None
    )
    descriptions = []
    for number, label in enumerate(labels, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=(
                hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
                if automatic
                else hd.seg.SegmentAlgorithmTypeValues.MANUAL
            ),
            algorithm_identification=algorithm,
        )
        made_by = f"{group.model_name} {group.version or ''}".strip() if automatic else "manual"
        description.SegmentDescription = f"{label} ({made_by})"[:64]
        descriptions.append(description)
    return descriptions


async def build_seg(
    storage: Storage, group: GroupInfo, masks: Sequence[MaskRef], source: SourceSeries
) -> hd.seg.Segmentation:
    """A new SEG instance in a new series (a re-export never overwrites an earlier one)."""
    if not masks:
        raise DicomMismatch(f"mask group {group.group_id} has no masks")
    positions = _positions(group, masks, source)
    # Only the source slices that carry a mask; highdicom drops the empty frames among them.
    used = sorted(set(positions))
    frame_of = {position: frame for frame, position in enumerate(used)}
    labels = sorted({segment_label(group, mask.label_name) for mask in masks})
    number_of = {label: number for number, label in enumerate(labels, start=1)}
    volume = MaskVolume(len(used), source.rows, source.columns, len(labels))
    await _decode_all(
        storage,
        masks,
        [frame_of[position] for position in positions],
        [number_of[segment_label(group, mask.label_name)] for mask in masks],
        volume,
        source,
    )
    source_images = [source.datasets[position] for position in used]
    try:
        return await asyncio.to_thread(_segmentation, group, labels, volume, source_images)
    except (ValueError, AttributeError) as error:
        # highdicom checks the source instances (required attributes, geometry).
        raise DicomMismatch(f"the SEG cannot be built from the source series: {error}") from error


def seg_options(group: GroupInfo, labels: Sequence[str]) -> dict[str, Any]:
    """highdicom's Segmentation arguments besides the source images and the pixels."""
    name = group.group_name or group.model_name or f"mask group {group.group_id}"
    return {
        "segmentation_type": hd.seg.SegmentationTypeValues.BINARY,
        "segment_descriptions": _segment_descriptions(group, labels),
        "series_instance_uid": generate_uid(),
        "series_number": SEG_SERIES_NUMBER,
        "sop_instance_uid": generate_uid(),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MANUFACTURER,
        "software_versions": package_version("pacs-masks"),
        "device_serial_number": "0",
        "content_label": "MASKS",
        "content_description": (group.description or f"pacs-masks group {group.group_id}")[:64],
        "series_description": f"SEG {name}"[:64],
        "omit_empty_frames": True,
    }


def _segmentation(
    group: GroupInfo, labels: Sequence[str], volume: MaskVolume, source_images: Sequence[Dataset]
) -> hd.seg.Segmentation:
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=volume.pixel_array(),
        **seg_options(group, labels),
    )
    if volume.overlaps:
        # Built from a stand-in: see app/dicom/seg_volume.py for why.
        pack_overlapping_frames(seg, volume, source_images)
    return seg


def summary(seg: Dataset) -> SegSummary:
    return SegSummary(
        series_instance_uid=str(seg.SeriesInstanceUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_count=len(seg.SegmentSequence),
        frame_count=int(seg.NumberOfFrames),
    )


# --- reading ---------------------------------------------------------------------------------

# Source instances decoded together when reading a SEG: bounded memory on long series.
READ_CHUNK = 16


@dataclass(frozen=True, slots=True)
class SegSegment:
    number: int
    label_name: str


def sanitize_label(text: str, taken: set[str], number: int) -> str:
    """A segment label as one of our label names ([A-Za-z0-9][A-Za-z0-9_-]{0,63}), unique."""
    cleaned = "".join(
        char if char.isascii() and (char.isalnum() or char in "_-") else "_" for char in text
    )
    cleaned = cleaned.lstrip("_-")[:64] or f"segment{number}"
    candidate, suffix = cleaned, 2
    while candidate in taken:
        tail = f"_{suffix}"
        candidate = cleaned[: 64 - len(tail)] + tail
        suffix += 1
    assert LABEL_PATTERN.match(candidate)
    taken.add(candidate)
    return candidate


def read_segments(seg: hd.seg.Segmentation) -> list[SegSegment]:
    taken: set[str] = set()
    return [
        SegSegment(
            int(item.SegmentNumber),
            sanitize_label(str(item.SegmentLabel), taken, int(item.SegmentNumber)),
        )
        for item in seg.SegmentSequence
    ]


def referenced_series(seg: hd.seg.Segmentation) -> str | None:
    for item in seg.get("ReferencedSeriesSequence", []):
        return str(item.SeriesInstanceUID)
    return None


def _referenced_instances(seg: hd.seg.Segmentation) -> set[str]:
    return {str(sop) for _study, _series, sop in seg.get_source_image_uids()}


def check_fits(seg: hd.seg.Segmentation, source: SourceSeries) -> None:
    """Refuses, in words, a SEG that does not lie on the source series."""
    unknown = _referenced_instances(seg) - set(source.index_by_sop)
    if unknown:
        raise DicomMismatch(
            f"the SEG refers to {len(unknown)} instance(s) that are not in source series "
            f"{source.series_instance_uid}"
        )
    if (int(seg.Rows), int(seg.Columns)) != (source.rows, source.columns):
        raise DicomMismatch(
            f"the SEG is {seg.Columns}x{seg.Rows}, its source series {source.columns}x{source.rows}"
        )


def iter_planes(
    seg: hd.seg.Segmentation, source: SourceSeries, segments: Sequence[SegSegment]
) -> Iterator[tuple[int, list[np.ndarray[Any, Any]]]]:
    """(source position, one boolean plane per segment; a non-zero value is inside) for every
    source instance, READ_CHUNK instances decoded at a time."""
    referenced = _referenced_instances(seg)
    numbers = [segment.number for segment in segments]
    uids = [str(dataset.SOPInstanceUID) for dataset in source.datasets]
    empty = np.zeros((source.rows, source.columns), np.bool_)
    for start in range(0, len(uids), READ_CHUNK):
        chunk = uids[start : start + READ_CHUNK]
        present = [uid for uid in chunk if uid in referenced]
        pixels = (
            seg.get_pixels_by_source_instance(
                source_sop_instance_uids=present,
                segment_numbers=numbers,
                combine_segments=False,
                ignore_spatial_locations=True,
                dtype=np.bool_,
            )
            if present
            else None
        )
        for offset, uid in enumerate(chunk):
            position = start + offset
            if pixels is None or uid not in present:
                yield position, [empty] * len(numbers)
                continue
            planes = pixels[present.index(uid)]
            yield position, [planes[:, :, index] for index in range(len(numbers))]
