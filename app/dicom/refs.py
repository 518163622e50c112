"""What a SEG is built from (a group and its masks) and what an export records of it.

Kept apart from app/dicom/seg.py so that the server, which records and schedules exports,
does not load the DICOM stack (highdicom, pydicom, NumPy, dicomweb-client: ~70 MB per
process) until an export or import actually runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MaskRef:
    slice_index: int
    label_name: str | None
    sop_instance_uid: str | None
    file_path: str


@dataclass(frozen=True, slots=True)
class GroupInfo:
    group_id: int
    group_name: str | None
    model_name: str | None
    version: str | None
    description: str | None
    slice_count: int


@dataclass(frozen=True, slots=True)
class SegSummary:
    series_instance_uid: str
    sop_instance_uid: str
    segment_count: int
    frame_count: int
