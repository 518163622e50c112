"""Where slices come from: a folder of PNGs, a NIfTI label volume, a NumPy array; and the
manifest with per-slice SOP Instance UIDs and confidence.

Every reader is lazy: a `SliceSet` yields `SliceSource`s whose `load()` reads or encodes one
slice when the uploader gets to it, so memory stays flat whatever the volume's size.

Orientation of NIfTI volumes: each slab is reoriented to RAS+ with nibabel's
`io_orientation`/`apply_orientation` (what `as_closest_canonical` does, one slice at a time
instead of the whole array). Slice index 0 is the most inferior axial slice and indexes grow
towards the head; `slice_order="superior-first"` reverses that for series stored head first.
Each PNG is the radiological view of a standard axial DICOM image (ImageOrientationPatient
1\\0\\0\\0\\1\\0): columns run from the patient's right to left, rows from anterior to
posterior.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from app.client.errors import BadInput

READ_CHUNK = 1 << 16
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Our own object names (slice_00007_liver.png) carry the label; otherwise the trailing digits
# of the name are the slice index (case12_0007.png).
OWN_NAME = re.compile(r"^slice_(?P<index>\d+)(?:_(?P<label>[A-Za-z0-9][A-Za-z0-9_-]*))?$")
TRAILING_INDEX = re.compile(r"(?P<index>\d+)$")
SliceOrder = Literal["inferior-first", "superior-first"]
VolumeMode = Literal["labelmap", "split"]


@dataclass(frozen=True, slots=True)
class EncodedSlice:
    body: bytes
    content_md5: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class SliceSource:
    slice_index: int
    label_name: str | None
    load: Callable[[], EncodedSlice]


@dataclass(frozen=True, slots=True)
class SliceSet:
    """One mask group's slices; `slices()` starts a fresh lazy pass each time."""

    slice_count: int
    slices: Callable[[], Iterator[SliceSource]]
    # Name of the group when a volume is split by label value.
    name: str | None = None
    label_value: int | None = None
    # How many slices `slices()` yields (several labels may share a slice index).
    mask_count: int | None = None

    @property
    def total(self) -> int:
        return self.slice_count if self.mask_count is None else self.mask_count


@dataclass(frozen=True, slots=True)
class SliceMeta:
    sop_instance_uid: str | None = None
    confidence: float | None = None


@dataclass
class Manifest:
    slices: dict[int, SliceMeta] = field(default_factory=dict)
    # Top-level fields of a JSON manifest (annotation, model, ...), used by `watch`.
    metadata: dict[str, Any] = field(default_factory=dict)


def _md5_base64(digest: Any) -> str:
    return base64.b64encode(digest.digest()).decode("ascii")


def _read_png(path: Path) -> EncodedSlice:
    md5 = hashlib.md5()
    buffer = bytearray()
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(READ_CHUNK):
                md5.update(chunk)
                buffer += chunk
    except OSError as error:
        raise BadInput(f"cannot read {path}: {error.strerror or error}") from error
    body = bytes(buffer)
    try:
        with Image.open(io.BytesIO(body)) as image:
            if image.format != "PNG":
                raise BadInput(f"{path} is not a PNG image")
            width, height = image.size
    except (OSError, SyntaxError) as error:
        raise BadInput(f"{path} is not a readable PNG image") from error
    return EncodedSlice(body, _md5_base64(md5), width, height)


def encode_png(array: npt.NDArray[Any], mode: Literal["1", "L"]) -> EncodedSlice:
    image = Image.fromarray(
        (array != 0) if mode == "1" else np.ascontiguousarray(array, dtype=np.uint8)
    )
    if mode == "1":
        image = image.convert("1")
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    body = out.getvalue()
    return EncodedSlice(
        body, _md5_base64(hashlib.md5(body)), width=image.size[0], height=image.size[1]
    )


def _checked_label(label: str | None) -> str | None:
    if label is not None and not LABEL_PATTERN.match(label):
        raise BadInput(
            f"label {label!r} must be 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return label


def png_folder(path: Path, label: str | None = None, slice_count: int | None = None) -> SliceSet:
    """The *.png files of a folder: index from the name (`slice_00007[_label].png`, or trailing
    digits as in `case_0007.png`); when some name has no index, sorted order gives it."""
    label = _checked_label(label)
    if not path.is_dir():
        raise BadInput(f"{path} is not a folder")
    files = sorted(item for item in path.iterdir() if item.suffix.lower() == ".png")
    if not files:
        raise BadInput(f"{path} holds no .png file")
    named: list[tuple[int, str | None, Path]] = []
    for file in files:
        own = OWN_NAME.match(file.stem)
        trailing = TRAILING_INDEX.search(file.stem)
        if own:
            named.append((int(own["index"]), own["label"] or label, file))
        elif trailing:
            named.append((int(trailing["index"]), label, file))
        else:
            named = [(position, label, file) for position, file in enumerate(files)]
            break
    seen: dict[tuple[int, str | None], Path] = {}
    for index, name, file in named:
        if (index, name) in seen:
            raise BadInput(f"{seen[(index, name)].name} and {file.name} are both slice {index}")
        _checked_label(name)
        seen[(index, name)] = file
    count = max(index for index, _, _ in named) + 1
    if slice_count is not None:
        if slice_count < count:
            raise BadInput(f"--slice-count {slice_count} is below the highest slice index")
        count = slice_count
    ordered = sorted(named, key=lambda item: (item[0], item[1] or ""))

    def slices() -> Iterator[SliceSource]:
        for index, name, file in ordered:
            yield SliceSource(index, name, lambda file=file: _read_png(file))  # type: ignore[misc]

    return SliceSet(count, slices, mask_count=len(ordered))


class _Volume:
    """A 3-D label array read one axial slice at a time, already in image orientation."""

    def __init__(self, slice_count: int, read: Callable[[int], npt.NDArray[Any]]) -> None:
        self.slice_count = slice_count
        self.read = read

    def label_values(self) -> list[int]:
        values: set[int] = set()
        for index in range(self.slice_count):
            values.update(int(value) for value in np.unique(self.read(index)))
        return sorted(value for value in values if value != 0)


def _check_integral(array: npt.NDArray[Any], source: Path) -> None:
    if array.dtype.kind == "f" and not np.all(np.equal(np.mod(array, 1), 0)):
        raise BadInput(f"{source} holds fractional values: a label volume must hold integers")
    if array.dtype.kind not in "biuf":
        raise BadInput(f"{source} holds {array.dtype} values, not labels")


def _volume_sets(
    volume: _Volume,
    source: Path,
    mode: VolumeMode,
    label: str | None,
    label_names: dict[int, str] | None,
) -> list[SliceSet]:
    label = _checked_label(label)
    count = volume.slice_count
    if count < 1:
        raise BadInput(f"{source} has no slice")

    def read(index: int) -> npt.NDArray[Any]:
        array = volume.read(index)
        _check_integral(array, source)
        return array

    if mode == "labelmap":

        def labelmap(index: int) -> EncodedSlice:
            array = read(index)
            if array.size and (array.min() < 0 or array.max() > 255):
                raise BadInput(
                    f"{source} slice {index} has label values outside 0..255; "
                    "use --split-labels for one binary group per label"
                )
            return encode_png(array, "L")

        def slices() -> Iterator[SliceSource]:
            for index in range(count):
                yield SliceSource(index, label, lambda index=index: labelmap(index))  # type: ignore[misc]

        return [SliceSet(count, slices)]

    sets = []
    for value in volume.label_values():
        name = _checked_label((label_names or {}).get(value) or f"label{value}")
        sets.append(_split_set(count, read, value, name))
    if not sets:
        raise BadInput(f"{source} holds no label value other than 0")
    return sets


def _split_set(
    count: int, read: Callable[[int], npt.NDArray[Any]], value: int, name: str | None
) -> SliceSet:
    def slices() -> Iterator[SliceSource]:
        for index in range(count):
            yield SliceSource(
                index,
                name,
                lambda index=index: encode_png(read(index) == value, "1"),  # type: ignore[misc]
            )

    return SliceSet(count, slices, name=name, label_value=value)


def nifti_volume(
    path: Path,
    *,
    mode: VolumeMode = "labelmap",
    label: str | None = None,
    label_names: dict[int, str] | None = None,
    slice_order: SliceOrder = "inferior-first",
) -> list[SliceSet]:
    import nibabel as nib
    from nibabel import orientations as nib_orientations
    from nibabel.filebasedimages import ImageFileError

    orientations: Any = nib_orientations  # untyped module
    try:
        # No memory map: slabs are read by seeking, so touched pages do not pile up in memory.
        image: Any = nib.load(str(path), mmap=False)
    except (OSError, ImageFileError, ValueError) as error:
        raise BadInput(f"cannot read {path} as NIfTI: {error}") from error
    shape = tuple(int(size) for size in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise BadInput(f"{path} has shape {shape}: a label volume must be 3-D")
    ornt = orientations.io_orientation(image.affine)
    # The input axis that becomes RAS+ axis 2 (superior), and whether it runs the other way.
    axis = int(next(row for row, (target, _) in enumerate(ornt) if int(target) == 2))
    flipped = ornt[axis][1] < 0
    count = shape[axis]
    proxy = image.dataobj

    def read(index: int) -> npt.NDArray[Any]:
        position = index if slice_order == "inferior-first" else count - 1 - index
        source_index = count - 1 - position if flipped else position
        slicer: list[slice | int] = [slice(None)] * len(image.shape)
        slicer[axis] = slice(source_index, source_index + 1)
        for extra in range(3, len(image.shape)):
            slicer[extra] = 0
        slab = np.asanyarray(proxy[tuple(slicer)])
        ras = orientations.apply_orientation(slab, ornt)[:, :, 0]
        # RAS+ (x to the right, y to the front) -> image rows front to back, columns right to left.
        return np.asarray(ras[::-1, ::-1].T)

    return _volume_sets(_Volume(count, read), path, mode, label, label_names)


def _npy_slices(path: Path) -> _Volume:
    """A C-order .npy read one slice per seek: neither the array nor a memory map of it
    stays resident (a map's touched pages would count as the process's memory)."""
    with path.open("rb") as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        offset = stream.tell()
    if dtype.hasobject or fortran_order:
        raise BadInput(f"{path} must be a C-order array of numbers")
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise BadInput(f"{path} has shape {shape}: expected (slices, rows, columns)")
    count = shape[1] * shape[2]

    def read(index: int) -> npt.NDArray[Any]:
        with path.open("rb") as stream:
            stream.seek(offset + index * count * dtype.itemsize)
            array = np.fromfile(stream, dtype=dtype, count=count)
        return array.reshape(shape[1], shape[2])

    return _Volume(int(shape[0]), read)


def npy_volume(
    path: Path,
    *,
    mode: VolumeMode = "labelmap",
    label: str | None = None,
    label_names: dict[int, str] | None = None,
    array_name: str | None = None,
) -> list[SliceSet]:
    """A (slices, rows, columns) array: a .npy is read slice by slice, an .npz member whole
    (zip members cannot be read in place)."""
    try:
        if path.suffix != ".npz":
            volume = _npy_slices(path)
        else:
            with np.load(path) as archive:
                names = list(archive.files)
                chosen = array_name or (names[0] if len(names) == 1 else None)
                if chosen is None or chosen not in names:
                    raise BadInput(f"{path} holds arrays {', '.join(names)}: name one with --array")
                array = archive[chosen]
            if array.ndim == 2:
                array = array[np.newaxis]
            if array.ndim != 3:
                raise BadInput(f"{path} has shape {array.shape}: expected (slices, rows, columns)")
            volume = _Volume(int(array.shape[0]), lambda index: np.asarray(array[index]))
    except (OSError, ValueError) as error:
        raise BadInput(f"cannot read {path} as a NumPy array: {error}") from error
    return _volume_sets(volume, path, mode, label, label_names)


def open_input(
    path: Path,
    *,
    split_labels: bool = False,
    label: str | None = None,
    label_names: dict[int, str] | None = None,
    slice_order: SliceOrder = "inferior-first",
    array_name: str | None = None,
    slice_count: int | None = None,
) -> list[SliceSet]:
    """The slice sets of a folder of PNGs, a .nii/.nii.gz or a .npy/.npz file."""
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    mode: VolumeMode = "split" if split_labels else "labelmap"
    if path.is_dir():
        if split_labels:
            raise BadInput("splitting by label applies to a NIfTI or NumPy volume, not a folder")
        return [png_folder(path, label, slice_count)]
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return nifti_volume(
            path, mode=mode, label=label, label_names=label_names, slice_order=slice_order
        )
    if path.suffix.lower() in (".npy", ".npz"):
        return npy_volume(
            path, mode=mode, label=label, label_names=label_names, array_name=array_name
        )
    raise BadInput(f"{path}: expected a folder of PNGs, a .nii/.nii.gz or a .npy/.npz file")


def _confidence(value: Any, where: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise BadInput(f"{where}: confidence {value!r} is not a number") from error
    if not 0.0 <= number <= 1.0:
        raise BadInput(f"{where}: confidence {number} is not between 0 and 1")
    return number


def _manifest_row(row: dict[str, Any], where: str) -> tuple[int, SliceMeta]:
    raw_index = row.get("sliceIndex", row.get("slice_index"))
    try:
        index = int(raw_index)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise BadInput(f"{where}: sliceIndex {raw_index!r} is not an integer") from error
    uid = row.get("sopInstanceUid", row.get("sop_instance_uid")) or None
    return index, SliceMeta(
        sop_instance_uid=str(uid) if uid is not None else None,
        confidence=_confidence(row.get("confidence"), where),
    )


def load_manifest(path: Path) -> Manifest:
    """CSV with columns sliceIndex, sopInstanceUid, confidence; or JSON
    {"slices": [{"sliceIndex": 0, "sopInstanceUid": "...", "confidence": 0.9}], ...}."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"cannot read manifest {path}: {error}") from error
    manifest = Manifest()
    rows: list[tuple[str, dict[str, Any]]]
    if path.suffix.lower() == ".json":
        try:
            document = json.loads(text)
        except ValueError as error:
            raise BadInput(f"manifest {path} is not valid JSON: {error}") from error
        if not isinstance(document, dict) or not isinstance(document.get("slices", []), list):
            raise BadInput(f'manifest {path} must be an object with a "slices" list')
        manifest.metadata = {key: value for key, value in document.items() if key != "slices"}
        rows = []
        for position, row in enumerate(document.get("slices", [])):
            if not isinstance(row, dict):
                raise BadInput(f"manifest {path}: slices[{position}] is not an object")
            rows.append((f"manifest {path} slices[{position}]", row))
    else:
        reader = csv.DictReader(io.StringIO(text))
        rows = [(f"manifest {path} line {line}", row) for line, row in enumerate(reader, 2)]
    for where, row in rows:
        index, meta = _manifest_row(row, where)
        if index in manifest.slices:
            raise BadInput(f"{where}: slice {index} appears twice")
        manifest.slices[index] = meta
    return manifest
