"""Benchmark: the real server (a subprocess, so its peak memory can be read) on PostgreSQL and
moto's S3 server over loopback. Prints server times (Server-Timing), client wall clock and the
server's peak RSS against their goals.

    .venv/bin/python bench/run.py [--database-url postgresql://...] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from figures import Report, add_json_argument, cpu_model, machine, proc_status_kib
from harness import (
    TREE,
    Client,
    Server,
    moto_settings,
    postgres_version,
    serving,
    stack,
)

from app.main import open_storage

Row = tuple[str, str, str, str, str]


def figure(name: str, values: list[float], unit: str, goal: float | None, digits: int = 0) -> Row:
    def fmt(value: float) -> str:
        return f"{value:.{digits}f} {unit}"

    top = max(values)
    verdict = "-" if goal is None else ("ok" if top <= goal else "MISSED")
    goal_text = "-" if goal is None else f"<= {fmt(goal)}"
    return (name, fmt(statistics.median(values)), fmt(top), goal_text, verdict)


def report_of(rows: list[Row], context: dict[str, Any]) -> Report:
    """The printed table as --json figures: the median as the value, the max in the note; a
    goal is met when the max is within it, as the table's verdict says."""
    report = Report("Server figures: batches, 100-slice flow, 10 x 1000 tree, memory (moto)")
    report.context = context
    for name, median, top, goal, verdict in rows:
        value, unit = median.split(" ", 1)
        item = report.add(name, float(value), unit, note=f"max {top}")
        if goal != "-":
            item.goal, item.ok = goal, verdict == "ok"
    return report


def print_table(rows: list[Row]) -> None:
    header: Row = ("figure", "median", "max", "goal", "")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


async def run(client: Client, repeat: int, pid: int) -> list[Row]:
    annotation = await client.annotation("1.2.826.0.1.3680043.9.1")
    request_ms: list[float] = []
    complete_ms: list[float] = []
    for _ in range(repeat):
        group = await client.group(annotation, 1000)
        timings = await client.upload(group, 1000)
        request_ms.append(timings[0])
        complete_ms.append(timings[1])
        print(
            f"  1000 slices: request {timings[0]:.1f} ms, complete {timings[1]:.1f} ms "
            f"(server); 1000 PUTs {client.phases[1]:.2f} s"
        )

    flow_s: list[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        await client.upload(await client.group(annotation, 100), 100)
        flow_s.append(time.perf_counter() - started)
        request, put, complete = client.phases
        print(
            f"  100-slice flow: {flow_s[-1]:.3f} s (request {request:.3f} s, "
            f"100 PUTs {put:.3f} s, complete {complete:.3f} s)"
        )

    tree_annotation = await client.annotation("1.2.826.0.1.3680043.9.2")
    for _ in range(10):
        await client.upload(await client.group(tree_annotation, 1000), 1000)
    tree_ms: list[float] = []
    tree_wall: list[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        data = await client.data(TREE, {"id": tree_annotation})
        tree_wall.append((time.perf_counter() - started) * 1000)
        tree_ms.append(client.server_ms)
        masks = sum(len(group["masks"]) for group in data["annotation"]["maskGroups"])
        if masks != 10_000:
            raise RuntimeError(f"tree has {masks} masks, expected 10000")
        print(f"  tree: server {client.server_ms:.1f} ms, {client.size / 1e6:.2f} MB")

    peak_mib = proc_status_kib(pid, "VmHWM") / 1024
    rss_mib = proc_status_kib(pid, "VmRSS") / 1024
    return [
        figure("requestMaskUploadUrls 1000 (server)", request_ms, "ms", 50),
        figure("completeMaskUpload 1000 (server)", complete_ms, "ms", 300),
        figure("100-slice flow (client wall clock)", flow_s, "s", 2.0, digits=2),
        figure("tree 10x1000 (server)", tree_ms, "ms", None),
        figure("tree 10x1000 (client wall clock)", tree_wall, "ms", None),
        figure("tree 10x1000 response size", [client.size / 1e6], "MB", None, digits=2),
        figure("server RSS at end", [rss_mib], "MiB", None),
        figure("server peak RSS (VmHWM)", [peak_mib], "MiB", 250),
    ]


async def storage_rows(moto_url: str, keys: list[str], repeat: int) -> list[Row]:
    """What completion waits on (the storage listing) and what presigning costs, measured
    here with the server's own storage code, to read the server's figures against."""
    storage = await open_storage(moto_settings(moto_url))
    try:
        listing_ms: list[float] = []
        presign_ms: list[float] = []
        for _ in range(repeat):
            started = time.perf_counter()
            found = await storage.stat_objects(keys)
            listing_ms.append((time.perf_counter() - started) * 1000)
            if len(found) != len(keys):
                raise RuntimeError(f"listing found {len(found)} of {len(keys)} objects")
            now = datetime.now(UTC)
            cpu = time.process_time()
            for key in keys:
                storage.presign_put(
                    key,
                    content_type="image/png",
                    content_md5="1B2M2Y8AsgTpgAmY7PhCfg==",
                    content_length=100,
                    expires_in=600,
                    now=now,
                )
            presign_ms.append((time.process_time() - cpu) * 1000)
    finally:
        await storage.aclose()
    return [
        figure("presign 1000 PUT URLs (CPU)", presign_ms, "ms", 50, digits=1),
        figure("storage listing, 1000 keys (moto)", listing_ms, "ms", None),
    ]


async def bench(server: Server, token: str, repeat: int) -> tuple[list[Row], list[str]]:
    await server.ready()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
        client = Client(http, token)
        rows = await run(client, repeat, server.process.pid)
        return rows, client.last_keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", help="an existing, empty PostgreSQL database")
    parser.add_argument("--repeat", type=int, default=5)
    add_json_argument(parser)
    args = parser.parse_args()

    with stack(args.database_url, moto=True) as built:
        print(f"machine:    {platform.platform()}")
        print(f"python:     {sys.version.split()[0]} ({platform.python_implementation()})")
        print(f"cpu:        {cpu_model()}, {os.cpu_count()} cores")
        postgresql = asyncio.run(postgres_version(built.database_url))
        print(f"postgresql: {postgresql}")
        print(f"repeat:     {args.repeat}\n")

        # The UPLOADER token, as an inference worker has.
        with serving(built.env, built.workdir) as server:
            rows, keys = asyncio.run(bench(server, built.uploader, args.repeat))
            rows += asyncio.run(storage_rows(built.s3_endpoint, keys, args.repeat))
    print()
    print_table(rows)
    context = {**machine(), "postgresql": postgresql, "s3": "moto (in the bench process)"}
    context["repeat"] = args.repeat
    report_of(rows, context).write(args.json)


if __name__ == "__main__":
    main()
