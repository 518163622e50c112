"""Benchmark: `pacs-masks upload` end to end, as an inference worker runs it: 1000 masks of
512x512 to the real server (a subprocess) on PostgreSQL and moto's S3 server over loopback.
Prints slices/s, MB/s and the client's peak memory, for a folder of ready PNGs and for a
NumPy label volume the client encodes itself. Not a test.

    .venv/bin/python bench/upload_cli.py [--slices 1000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from figures import Report, add_json_argument, cpu_model, machine, proc_status_kib
from harness import (
    CLI,
    mask,
    serving,
    stack,
)
from PIL import Image

SIZE = 512


def make_inputs(folder: Path, count: int) -> tuple[Path, Path]:
    pngs = folder / "pngs"
    pngs.mkdir()
    volume = np.lib.format.open_memmap(
        folder / "volume.npy", mode="w+", dtype=np.uint8, shape=(count, SIZE, SIZE)
    )
    for index in range(count):
        array = mask(index, count)
        Image.fromarray(array).save(pngs / f"slice_{index:05d}.png")
        volume[index] = array
    volume.flush()
    del volume
    return pngs, folder / "volume.npy"


def upload(
    env: dict[str, str], source: Path, concurrency: int
) -> tuple[dict[str, object], float, float, int]:
    """Runs one upload; returns its summary, wall seconds, client CPU seconds, peak RSS KiB."""
    command = [CLI, "upload", str(source), "--study-uid", "1.2.3.4", "--model", "bench"]
    command += ["--concurrency", str(concurrency), "--json"]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        # VmHWM is the peak of this process's own memory since exec (wait4's ru_maxrss would
        # include the forking parent's). It only grows, so the last reading is the peak
        # up to a few milliseconds before the end.
        peak_kib = 0
        while True:
            try:
                peak_kib = max(peak_kib, proc_status_kib(process.pid, "VmHWM"))
            except (OSError, RuntimeError):
                pass
            if process.poll() is not None:
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(f"upload failed ({process.returncode}): {stderr.decode()[-2000:]}")
    (summary,) = json.loads(stdout)["groups"]
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return summary, wall, cpu, peak_kib


def measure(args: argparse.Namespace, workdir: Path, report: Report) -> None:
    with stack(moto=True) as built, serving(built.env, built.workdir) as server:
        asyncio.run(server.ready())
        pngs, volume = make_inputs(workdir, args.slices)
        client_env = {
            "PATH": os.environ.get("PATH", ""),
            "PACS_MASKS_URL": server.url,
            "PACS_MASKS_TOKEN": built.uploader,
        }
        print(
            f"{'input':<24} {'slices/s':>9} {'MB/s':>6} {'upload s':>9} {'wall s':>7} "
            f"{'client CPU s':>12} {'peak RSS':>9}"
        )
        for name, source in (("folder of PNGs", pngs), ("NumPy volume (encoded)", volume)):
            summary, wall, cpu, peak_kib = upload(client_env, source, args.concurrency)
            seconds = float(summary["seconds"])  # type: ignore[arg-type]
            slices = int(summary["uploadedSlices"])  # type: ignore[call-overload]
            megabytes = int(summary["uploadedBytes"]) / 1e6  # type: ignore[call-overload]
            print(
                f"{name:<24} {slices / seconds:>9.0f} {megabytes / seconds:>6.2f} "
                f"{seconds:>9.2f} {wall:>7.2f} {cpu:>12.2f} {peak_kib / 1024:>5.0f} MiB"
                f"   ({megabytes:.1f} MB in {slices} slices)"
            )
            note = f"{megabytes:.1f} MB in {slices} slices, concurrency {args.concurrency}"
            report.add(f"{name}: slices/s", slices / seconds, "slices/s", note=note)
            report.add(f"{name}: MB/s", megabytes / seconds, "MB/s")
            report.add(f"{name}: process wall clock", wall, "s", note="with start-up")
            report.add(f"{name}: client CPU", cpu, "s")
            report.add(f"{name}: client peak RSS", peak_kib / 1024, "MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    add_json_argument(parser)
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} cores")
    print(f"python:  {sys.version.split()[0]}; {args.slices} slices of {SIZE}x{SIZE}\n")
    report = Report(f"`pacs-masks upload` end to end, {args.slices} masks of {SIZE}x{SIZE} (moto)")
    report.context = {**machine(), "s3": "moto (in the bench process)"}
    with tempfile.TemporaryDirectory(prefix="pacs-masks-bench-") as workdir:
        measure(args, Path(workdir), report)
    report.write(args.json)


if __name__ == "__main__":
    main()
