"""Benchmark: DICOM SEG export of a 500-slice 512x512 group with 3 labels (on demand, not a test).

The masks are real PNGs in the local storage backend; the source series is 500 CT headers
(no pixel data, as WADO-RS metadata gives them). The export path is the server's own:
`build_seg` streams every mask from storage, decodes it into the mask volume, highdicom
encodes the SEG, which is then written out (as the download route does). Two cases, each in a
process of its own (peak RSS is per process): labels side by side, and labels overlapping on
every slice (the case that once held the volume as one plane per label plus highdicom's int64
overlap check). Prints, per case, the time of each stage, the SEG's size and the peak RSS
above the process's state before the export, beside the size of one label volume (what "the
whole volume" weighs); the goal is a peak of at most twice that.

    .venv/bin/python bench/seg_export.py [--slices 500] [--size 512] [--labels 3]
        [--case both|apart|overlap] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from figures import figure_dict, proc_status_kib
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from app.config import Settings
from app.dicom.seg import GroupInfo, MaskRef, build_seg, summary
from app.dicom.source import order_series
from app.local_storage import LocalStorage
from app.storage import mask_key

# The export may hold at most this many label volumes at its peak (one volume, the packed
# frames twice while they are joined, the decoding threads), overlapping labels or not...
PEAK_GOAL_VOLUMES = 2.0
# ...and overlapping labels about as much as labels side by side.
OVERLAP_GOAL_RATIO = 1.25
VOLUME_FIGURE = "one label volume"

figure = partial(figure_dict, digits=3)


class PeakRss:
    """The process's peak RSS from now on, in MiB above its RSS now. Linux resets the peak
    (VmHWM) through /proc/self/clear_refs; elsewhere the peak so far is the baseline."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = self._status("VmRSS")
            self.reset = True
        except (OSError, RuntimeError):
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.reset = False

    @staticmethod
    def _status(field: str) -> float:
        return proc_status_kib(os.getpid(), field) / 1024

    def above(self) -> float:
        peak = (
            self._status("VmHWM")
            if self.reset
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        return peak - self.baseline


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


async def export_case(args: argparse.Namespace, overlap: bool) -> list[dict[str, Any]]:
    """One export in this process; its figures, named after the case."""
    labels = [f"label{number}" for number in range(args.labels)]
    case = "overlapping" if overlap else "apart"
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
                path.write_bytes(mask_png(args.size, index, number, overlap))
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
        peak = PeakRss()
        started, cpu_started = time.perf_counter(), time.process_time()
        seg = await build_seg(storage, group, masks, source)
        built, cpu_built = time.perf_counter(), time.process_time()
        out = Path(folder) / "seg.dcm"
        seg.save_as(out, enforce_file_format=True)
        written = time.perf_counter()
        above = peak.above()
        done = summary(seg)
        seg_mib = out.stat().st_size / 2**20
        await storage.aclose()
    volume_mib = args.slices * args.size * args.size / 2**20
    goal = PEAK_GOAL_VOLUMES * volume_mib
    print(
        f"SEG export, {args.slices} slices {args.size}x{args.size}, {args.labels} labels "
        f"{case}, {len(masks)} PNG masks"
    )
    print(
        f"  build (storage reads, PNG decode, highdicom) {built - started:7.2f} s "
        f"({cpu_built - cpu_started:.2f} s CPU, all threads: steadier on a shared machine)"
    )
    print(f"  write                                        {written - built:7.2f} s")
    print(f"  SEG: {seg_mib:.1f} MiB, {done.frame_count} frames, {done.segment_count} segments")
    print(
        f"  peak RSS {above:.0f} MiB above the state before the export "
        f"({above / volume_mib:.2f} label volumes of {volume_mib:.0f} MiB; goal <= "
        f"{PEAK_GOAL_VOLUMES:g}, {goal:.0f} MiB)",
        flush=True,
    )
    return [
        figure(f"{case}: build (storage reads, PNG decode, highdicom)", built - started, "s"),
        figure(f"{case}: build CPU time (all threads)", cpu_built - cpu_started, "s"),
        figure(f"{case}: write", written - built, "s"),
        figure(f"{case}: SEG size", seg_mib, "MiB"),
        figure(f"{case}: SEG frames", done.frame_count, "frames"),
        figure(
            f"{case}: peak RSS above the state before the export",
            above,
            "MiB",
            f"<= {PEAK_GOAL_VOLUMES:g} label volumes ({goal:.0f} MiB)",
            above <= goal,
        ),
        figure(f"{case}: peak RSS in label volumes", above / volume_mib, "volumes"),
    ]


def run_alone(args: argparse.Namespace, case: str) -> list[dict[str, Any]]:
    """A case in a fresh process, so that its peak RSS is its own."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "figures.json"
        command = [sys.executable, __file__, "--case", case, "--json", str(path)]
        command += ["--slices", str(args.slices), "--size", str(args.size)]
        command += ["--labels", str(args.labels)]
        subprocess.run(command, check=True)
        figures: list[dict[str, Any]] = json.loads(path.read_text())["figures"]
        # The volume's size is the run's, given once.
        return [item for item in figures if item["name"] != VOLUME_FIGURE]


def main(args: argparse.Namespace) -> None:
    volume_mib = args.slices * args.size * args.size / 2**20
    if args.case == "both":
        figures = run_alone(args, "apart") + run_alone(args, "overlap")
        peaks = [item["value"] for item in figures if item["unit"] == "volumes"]
        ratio = peaks[1] / peaks[0]
        print(f"overlapping / apart peak RSS: {ratio:.2f}x (goal <= {OVERLAP_GOAL_RATIO:g})")
        figures.append(
            figure(
                "peak RSS, overlapping / apart",
                ratio,
                "x",
                f"<= {OVERLAP_GOAL_RATIO:g}",
                ratio <= OVERLAP_GOAL_RATIO,
            )
        )
    else:
        figures = asyncio.run(export_case(args, args.case == "overlap"))
    figures.append(figure(VOLUME_FIGURE, volume_mib, "MiB"))
    if args.json:
        context = {
            "slices": args.slices,
            "size": args.size,
            "labels": args.labels,
            "case": args.case,
            "python": platform.python_version(),
            "highdicom": version("highdicom"),
            "numpy": version("numpy"),
            "machine": platform.machine(),
        }
        args.json.write_text(
            json.dumps(
                {"title": "DICOM SEG export", "figures": figures, "context": context}, indent=2
            )
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--labels", type=int, default=3)
    parser.add_argument(
        "--case",
        choices=["both", "apart", "overlap"],
        default="both",
        help="labels side by side, overlapping on every slice, or both (each in its own process)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    main(parser.parse_args())
