"""The source series of a mask group: its instances in slice order, from their geometry.

sliceIndex 0 is the instance whose ImagePositionPatient lies first along the slice normal
(the cross product of the row and column direction cosines of ImageOrientationPatient); for
an axial series in the usual orientation (1,0,0,0,1,0) the normal points to the head, so
sliceIndex 0 is the most inferior slice. InstanceNumber is never used: it need not follow the
geometry.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from app.dicom.errors import DicomMismatch
from app.errors import NotFound

ORIENTATION_TOLERANCE = 1e-4
# Two slices closer than this along the normal are the same position (mm).
POSITION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SourceSeries:
    study_instance_uid: str
    series_instance_uid: str
    # Without pixel data, in slice order (see the module docstring).
    datasets: list[Dataset]
    rows: int
    columns: int
    index_by_sop: dict[str, int] = field(repr=False)

    def __len__(self) -> int:
        return len(self.datasets)


def _floats(dataset: Dataset, keyword: str, count: int, where: str) -> np.ndarray[Any, Any]:
    value = dataset.get(keyword)
    if value is None or len(value) != count:
        raise DicomMismatch(f"{where} has no usable {keyword}: slices cannot be ordered")
    return np.array([float(item) for item in value])


def order_series(
    study_instance_uid: str, series_instance_uid: str, datasets: Sequence[Dataset]
) -> SourceSeries:
    """Checks that the instances form one stack of parallel slices of one size and orders
    them along the normal; refuses, in words, anything else."""
    if not datasets:
        raise NotFound(
            f"series {series_instance_uid} of study {study_instance_uid} has no instances"
        )
    first = datasets[0]
    orientation = _floats(first, "ImageOrientationPatient", 6, "the first source instance")
    normal = np.cross(orientation[:3], orientation[3:])
    rows, columns = int(first.Rows), int(first.Columns)
    frame_of_reference = first.get("FrameOfReferenceUID")
    positions: list[tuple[float, Dataset]] = []
    for dataset in datasets:
        where = f"source instance {dataset.SOPInstanceUID}"
        if int(dataset.get("NumberOfFrames", 1) or 1) != 1:
            raise DicomMismatch(f"{where} is multi-frame; only single-frame series are supported")
        other = _floats(dataset, "ImageOrientationPatient", 6, where)
        if not np.allclose(other, orientation, atol=ORIENTATION_TOLERANCE):
            raise DicomMismatch(f"{where} has another orientation than the rest of the series")
        if (int(dataset.Rows), int(dataset.Columns)) != (rows, columns):
            raise DicomMismatch(
                f"{where} is {dataset.Columns}x{dataset.Rows}, the series is {columns}x{rows}"
            )
        if dataset.get("FrameOfReferenceUID") != frame_of_reference:
            raise DicomMismatch(f"{where} has another FrameOfReferenceUID than the series")
        position = _floats(dataset, "ImagePositionPatient", 3, where)
        positions.append((float(np.dot(position, normal)), dataset))
    positions.sort(key=lambda item: item[0])
    for (before, _), (after, dataset) in itertools.pairwise(positions):
        if after - before < POSITION_TOLERANCE:
            raise DicomMismatch(
                f"source instance {dataset.SOPInstanceUID} lies at the same position as "
                "another one: the series is not a single stack"
            )
    ordered = [dataset for _, dataset in positions]
    return SourceSeries(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        datasets=ordered,
        rows=rows,
        columns=columns,
        index_by_sop={str(dataset.SOPInstanceUID): index for index, dataset in enumerate(ordered)},
    )


def _without_bulk_data(item: dict[str, Any]) -> dict[str, Any]:
    # DICOMweb metadata names pixel data by BulkDataURI; nothing here needs it.
    return {tag: value for tag, value in item.items() if "BulkDataURI" not in value}


def datasets_from_metadata(items: Iterable[dict[str, Any]]) -> list[Dataset]:
    return [Dataset.from_json(_without_bulk_data(item)) for item in items]


def read_source_dir(
    directory: Path, study_instance_uid: str, series_instance_uid: str
) -> SourceSeries:
    """The series' instances among the DICOM files under `directory` (headers only)."""
    if not directory.is_dir():
        raise NotFound(f"{directory} is not a directory")
    found: list[Dataset] = []
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if dataset.get("SeriesInstanceUID") == series_instance_uid:
            found.append(dataset)
    if not found:
        raise NotFound(f"no instance of series {series_instance_uid} under {directory}")
    return order_series(study_instance_uid, series_instance_uid, found)
