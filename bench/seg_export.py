"""Benchmark: DICOM SEG export of a 500-slice 512x512 group with 3 labels (on demand, not a test).

The masks are real PNGs in the local storage backend; the source series is 500 CT headers
(no pixel data, as WADO-RS metadata gives them). The export path is the server's own:
`build_seg` streams every mask from storage, decodes it into the label volume, highdicom
encodes the SEG, which is then written out (as the download route does). Prints the time of
each stage, the SEG's size and the process's peak RSS above its state before the export,
beside the size of one label volume (what "the whole volume" weighs).

    .venv/bin/python bench/seg_export.py [--slices 500] [--size 512] [--labels 3] [--overlap]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from figures import Report, add_json_argument, machine
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from app.config import Settings
from app.dicom.seg import GroupInfo, MaskRef, build_seg, summary
from app.dicom.source import order_series
from app.local_storage import LocalStorage
from app.storage import mask_key


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def source_headers(slices: int, size: int) -> list[Dataset]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for index in range(slices):
        dataset = Dataset()
        dataset.SOPClassUID = CTImageStorage
        dataset.SOPInstanceUID = generate_uid()
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = series
        dataset.FrameOfReferenceUID = frame
        dataset.Modality = "CT"
        dataset.PatientID = "BENCH"
        dataset.PatientName = "Bench^Phantom"
        dataset.PatientBirthDate = ""
        dataset.PatientSex = "O"
        dataset.StudyDate = "20260101"
        dataset.StudyTime = "120000"
        dataset.StudyID = "1"
        dataset.AccessionNumber = ""
        dataset.ReferringPhysicianName = ""
        dataset.SeriesNumber = 1
        dataset.InstanceNumber = index + 1
        dataset.Rows = dataset.Columns = size
        dataset.PixelSpacing = [0.7, 0.7]
        dataset.SliceThickness = 1.0
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0, 0, float(index)]
        datasets.append(dataset)
    return datasets


def mask_png(size: int, index: int, label: int, overlap: bool) -> bytes:
    plane = np.zeros((size, size), np.uint8)
    top = size // 8 + (index * 7 + label * 13) % (size // 4)
    left = size // 10 if overlap else size // 10 + label * (size // 4)
    plane[top : top + size // 3, left : left + size // 5] = 255
    buffer = io.BytesIO()
    Image.fromarray(plane, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


async def main(args: argparse.Namespace, report: Report) -> None:
    labels = [f"label{number}" for number in range(args.labels)]
    with tempfile.TemporaryDirectory() as folder:
        storage = LocalStorage.from_settings(
            Settings(_env_file=None, var_dir=Path(folder), storage_provider="local")
        )
        masks = []
        for index in range(args.slices):
            for number, label in enumerate(labels):
                key = mask_key(1, 1, index, label, "image/png")
                path = Path(folder) / "storage" / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(mask_png(args.size, index, number, args.overlap))
                masks.append(MaskRef(index, label, None, key))
        datasets = source_headers(args.slices, args.size)
        source = order_series(
            str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID), datasets
        )
        group = GroupInfo(1, "bench", "bench-model", "1.0", None, args.slices)
        # A first tiny export loads what highdicom and pydicom load once per process (code
        # dictionaries): a running server has paid that before.
        warm = [mask for mask in masks if mask.slice_index == 0]
        warm_group = GroupInfo(1, "warm-up", "bench-model", "1.0", None, 1)
        warm_source = order_series(
            str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID), datasets[:1]
        )
        await build_seg(storage, warm_group, warm, warm_source)
        before = peak_rss_mib()
        started = time.perf_counter()
        seg = await build_seg(storage, group, masks, source)
        built = time.perf_counter()
        out = Path(folder) / "seg.dcm"
        seg.save_as(out, enforce_file_format=True)
        written = time.perf_counter()
        done = summary(seg)
        volume_mib = args.slices * args.size * args.size / 2**20
        print(
            f"SEG export, {args.slices} slices {args.size}x{args.size}, {args.labels} labels"
            f"{' (overlapping)' if args.overlap else ''}, {len(masks)} PNG masks"
        )
        print(f"  build (storage reads, PNG decode, highdicom) {built - started:7.2f} s")
        print(f"  write                                        {written - built:7.2f} s")
        print(
            f"  SEG: {out.stat().st_size / 2**20:.1f} MiB, {done.frame_count} frames, "
            f"{done.segment_count} segments"
        )
        print(
            f"  peak RSS {peak_rss_mib():.0f} MiB, {peak_rss_mib() - before:.0f} MiB above the "
            f"state before the export; one label volume is {volume_mib:.0f} MiB"
        )
        await storage.aclose()
        case = f"{args.slices} slices {args.size}x{args.size}, {args.labels} labels"
        report.add("build (storage reads, PNG decode, highdicom)", built - started, "s", note=case)
        report.add("write", written - built, "s")
        report.add("SEG size", out.stat().st_size / 2**20, "MiB", note=f"{done.frame_count} frames")
        report.add("peak RSS above the state before", peak_rss_mib() - before, "MiB")
        report.add("one label volume", volume_mib, "MiB", note="what the whole volume weighs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--labels", type=int, default=3)
    parser.add_argument("--overlap", action="store_true", help="labels overlap on pixels")
    add_json_argument(parser)
    arguments = parser.parse_args()
    seg_report = Report("DICOM SEG export (local storage, in process)")
    seg_report.context = machine()
    asyncio.run(main(arguments, seg_report))
    seg_report.write(arguments.json)
