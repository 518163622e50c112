"""Benchmark: big mask trees (issue 12, goal 3). The real server (`pacs-masks serve`, a
subprocess so its peak memory can be read) on PostgreSQL and moto's S3 server over loopback.

Seeds 10 groups × 1000 and 10 groups × 10,000 completed masks by bulk insert, times the TREE
query of bench/harness.py at concurrency 1 and, side by side, the raw SQL that returns the same
tree as JSON with json_agg through asyncpg (the "raw-SQL JSON bound"; its viewUrl is the same
path with a placeholder signature, since SQL cannot sign it), and reads the server's peak RSS
after the 10 × 10,000 tree.

    .venv/bin/python bench/big_trees.py [--repeat 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from figures import figure_dict, proc_status_kib
from harness import (
    TIMING,
    TREE,
    Server,
    host_context,
    print_context,
    serving,
    stack,
)

TITLE = "Big mask trees (10 groups x 1000 and x 10,000 masks, concurrency 1)"
GROUPS = 10
# Goals of issue 12: within 2.5x of the raw-SQL JSON bound; peak RSS <= 250 MB.
RATIO_GOAL = 2.5
PEAK_GOAL_MB = 250.0

# The same tree, same order, same JSON shape (ids as strings, BigInt as a number).
RAW_TREE = """
SELECT json_build_object('data', json_build_object('annotation', json_build_object(
  'id', a.id::text,
  'maskGroups', coalesce((
    SELECT json_agg(json_build_object(
      'id', g.id::text, 'status', g.status, 'uploadedSliceCount', g.uploaded_slice_count,
      'masks', coalesce((
        SELECT json_agg(json_build_object(
          'id', m.id::text, 'sliceIndex', m.slice_index, 'labelName', m.label_name,
          'filePath', m.file_path, 'fileSize', m.file_size, 'checksum', m.checksum,
          'mimeType', m.mime_type,
          'viewUrl', '/api/mask-group/' || g.id || '/view?slice=' || m.slice_index
            || coalesce('&label=' || m.label_name, '')
            || '&expires=1764000000&signature=AAAAAAAAAAAAAAAAAAAAAA'
        ) ORDER BY m.slice_index, coalesce(m.label_name, ''))
        FROM annotation_mask m WHERE m.mask_group_id = g.id), '[]'::json)
    ) ORDER BY g.id)
    FROM annotation_mask_group g
    WHERE g.annotation_id = a.id AND g.deleted_at IS NULL), '[]'::json)
)))::text
FROM annotation_annotation a WHERE a.id = $1
"""


async def seed(database_url: str, masks_per_group: int, study: str) -> int:
    """One annotation with GROUPS complete groups of `masks_per_group` masks, by COPY."""
    connection = await asyncpg.connect(database_url)
    now = datetime.now(UTC)
    try:
        async with connection.transaction():
            annotation_id: int = await connection.fetchval(
                "INSERT INTO annotation_annotation (study_instance_uid, series_instance_uid,"
                " created_by, created_at) VALUES ($1, $2, 'bench', $3) RETURNING id",
                study,
                f"{study}.1",
                now,
            )
            group_ids = [
                await connection.fetchval(
                    "INSERT INTO annotation_mask_group (annotation_id, slice_count, mask_type,"
                    " created_by, created_at, status, uploaded_slice_count, object_count,"
                    " total_bytes) VALUES ($1, $2, 'segmentation', 'bench', $3, 'COMPLETE',"
                    " $2, $2, $4) RETURNING id",
                    annotation_id,
                    masks_per_group,
                    now,
                    masks_per_group * 4096,
                )
                for _ in range(GROUPS)
            ]
            records = [
                (
                    group_id,
                    index,
                    f"mask/{annotation_id}/{group_id}/slice_{index:05d}.png",
                    "image/png",
                    4096 + index,
                    f"md5:{index:032x}",
                    512,
                    512,
                    now,
                )
                for group_id in group_ids
                for index in range(masks_per_group)
            ]
            await connection.copy_records_to_table(
                "annotation_mask",
                records=records,
                columns=[
                    "mask_group_id",
                    "slice_index",
                    "file_path",
                    "mime_type",
                    "file_size",
                    "checksum",
                    "width",
                    "height",
                    "created_at",
                ],
            )
        await connection.execute("ANALYZE")
    finally:
        await connection.close()
    return annotation_id


def summary(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


async def time_tree(
    http: httpx.AsyncClient, token: str, annotation_id: int, expected: int, repeat: int
) -> tuple[list[float], list[float], int]:
    """Client wall-clock and server (Server-Timing) ms of the TREE query, one at a time."""
    payload = {"query": TREE, "variables": {"id": str(annotation_id)}}
    headers = {"Authorization": f"Bearer {token}"}
    wall: list[float] = []
    server: list[float] = []
    size = 0
    for _ in range(repeat):
        started = time.perf_counter()
        response = await http.post("/graphql", json=payload, headers=headers)
        elapsed = (time.perf_counter() - started) * 1000
        body = response.json()
        if response.status_code != 200 or body.get("errors"):
            raise RuntimeError(f"tree failed ({response.status_code}): {response.text[:500]}")
        masks = sum(len(group["masks"]) for group in body["data"]["annotation"]["maskGroups"])
        if masks != expected:
            raise RuntimeError(f"tree has {masks} masks, expected {expected}")
        match = TIMING.search(response.headers.get("server-timing", ""))
        wall.append(elapsed)
        server.append(float(match.group(1)) if match else float("nan"))
        size = len(response.content)
    return wall, server, size


async def time_raw(database_url: str, annotation_id: int, repeat: int) -> tuple[list[float], int]:
    connection = await asyncpg.connect(database_url)
    try:
        times: list[float] = []
        size = 0
        for _ in range(repeat):
            started = time.perf_counter()
            text: str = await connection.fetchval(RAW_TREE, annotation_id)
            times.append((time.perf_counter() - started) * 1000)
            size = len(text.encode())
        return times, size
    finally:
        await connection.close()


Figure = dict[str, Any]


fig = partial(figure_dict, digits=2)


async def bench(server: Server, token: str, database_url: str, repeat: int) -> list[Figure]:
    await server.ready()
    process = server.process
    figures: list[Figure] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
        for per_group, repeats in ((1000, repeat), (10_000, max(3, repeat // 2))):
            label = f"{GROUPS}x{per_group}"
            annotation_id = await seed(
                database_url, per_group, f"1.2.826.0.1.3680043.10.{per_group}"
            )
            # One warm-up each, so that both sides run with warm caches.
            await time_tree(http, token, annotation_id, GROUPS * per_group, 1)
            await time_raw(database_url, annotation_id, 1)
            wall, server, size = await time_tree(
                http, token, annotation_id, GROUPS * per_group, repeats
            )
            raw, raw_size = await time_raw(database_url, annotation_id, repeats)
            wall_median, wall_p95 = summary(wall)
            server_median, server_p95 = summary(server)
            raw_median, raw_p95 = summary(raw)
            ratio = wall_median / raw_median
            print(
                f"  tree {label}: wall median {wall_median:.1f} ms p95 {wall_p95:.1f} ms; "
                f"server median {server_median:.1f} ms p95 {server_p95:.1f} ms; "
                f"{size / 1e6:.2f} MB"
            )
            print(
                f"  raw SQL json_agg {label}: median {raw_median:.1f} ms p95 {raw_p95:.1f} ms; "
                f"{raw_size / 1e6:.2f} MB; ratio (wall medians) {ratio:.2f}x"
            )
            figures += [
                fig(f"tree {label} (client wall, median)", wall_median, "ms"),
                fig(f"tree {label} (client wall, p95)", wall_p95, "ms"),
                fig(f"tree {label} (server, median)", server_median, "ms"),
                fig(f"raw SQL json_agg {label} (median)", raw_median, "ms"),
                fig(
                    f"tree {label} / raw SQL json_agg (medians)",
                    ratio,
                    "x",
                    goal=f"<= {RATIO_GOAL}" if per_group == 1000 else None,
                    ok=ratio <= RATIO_GOAL if per_group == 1000 else None,
                ),
                fig(f"tree {label} response size", size / 1e6, "MB"),
            ]
            if per_group == 10_000:
                peak_mb = proc_status_kib(process.pid, "VmHWM") * 1024 / 1e6
                print(f"  server peak RSS (VmHWM) after the {label} tree: {peak_mb:.0f} MB")
                figures.append(
                    fig(
                        f"server peak RSS after the {label} tree (VmHWM)",
                        peak_mb,
                        "MB",
                        goal=f"<= {PEAK_GOAL_MB:.0f}",
                        ok=peak_mb <= PEAK_GOAL_MB,
                    )
                )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the figures to this file as JSON")
    args = parser.parse_args()

    with stack(moto=True) as built:
        context = {**host_context(built.database_url), "repeat": args.repeat}
        print_context(context)
        print()
        with serving(built.env, built.workdir) as server:
            figures = asyncio.run(bench(server, built.reader, built.database_url, args.repeat))
        print()
        for item in figures:
            goal = (
                f"  (goal {item['goal']}: {'ok' if item['ok'] else 'MISSED'})"
                if item["goal"]
                else ""
            )
            print(f"  {item['name']}: {item['value']} {item['unit']}{goal}")
        if args.json is not None:
            args.json.write_text(
                json.dumps({"title": TITLE, "figures": figures, "context": context}, indent=2)
                + "\n"
            )


if __name__ == "__main__":
    main()
