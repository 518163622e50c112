"""Benchmark: viewers at scale (issue 12, goal 1). 50 concurrent closed-loop viewers read small
trees (2 groups x 50 masks, the README's step-6 query) for 60 s while 2 inference workers
upload 1000 slices each with `pacs-masks upload`; `pacs-masks serve --workers N` on PostgreSQL
and SeaweedFS's S3 API, all over loopback. The viewers are wrk (its own process, C); the
uploads are separate processes. Prints p50/p95/p99, requests/s, errors and the upload rate.

Then, on the same server and data (unless --no-peers), the comparisons of bench/peers.py:
small trees at concurrency 8 beside PostGraphile 4, the 10 x 1000 tree at concurrency 1
beside PostGraphile and the json_agg bound.

    .venv/bin/python bench/load.py [--workers N] [--viewers 50] [--seconds 60]
        [--uploads 2] [--slices 1000] [--no-peers] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from figures import CpuShares, Report, add_json_argument
from harness import (
    CLI,
    Stack,
    add_workers_argument,
    background_settled,
    count_masks,
    mask_pngs,
    run_wrk,
    seed_trees,
    served,
    stack,
    tree_body,
    workers_or_default,
)
from peers import compare, context

P95_GOAL_MS = 200


def upload(base_url: str, token: str, source: Path, study: str) -> dict[str, Any]:
    """One `pacs-masks upload` process, as an inference worker runs it; its JSON summary."""
    command = [CLI, "upload", str(source), "--study-uid", study, "--model", "bench-load"]
    command += ["--json"]
    env = {"PATH": str(Path(CLI).parent), "PACS_MASKS_URL": base_url, "PACS_MASKS_TOKEN": token}
    if "PYTHONPATH" in os.environ:  # the worktree's `app` when run from one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr).strip()[-500:], "wall": wall}
    (summary,) = json.loads(done.stdout)["groups"]
    return {**summary, "wall": wall}


async def viewers_with_uploads(
    args: argparse.Namespace, built: Stack, base_url: str, bodies: list[str], pngs: Path
) -> tuple[Any, list[dict[str, Any]], dict[str, float]]:
    """The viewers' run, the uploads' summaries and the CPU seconds each kind of process
    spent during the viewers' run."""
    auth = {"Authorization": f"Bearer {built.reader}"}
    url = f"{base_url}/graphql"
    await run_wrk(url, bodies, auth, connections=2, seconds=3)  # warm-up
    uploads = asyncio.gather(
        *(
            asyncio.to_thread(
                upload, base_url, built.uploader, pngs, f"1.2.826.0.1.3680043.12.9.{n}"
            )
            for n in range(args.uploads)
        )
    )
    # A loaded machine takes many seconds to start a Python process: the viewers start once
    # every upload has asked for its URLs, so the two overlap.
    waited = await uploads_started(built, args.uploads, uploads)
    print(f"  the uploads asked for URLs after {waited:.0f} s; the viewers start", flush=True)
    shares = CpuShares()
    shares.sample()
    sampling = asyncio.create_task(_sample_every(shares, 0.5))
    try:
        load = await run_wrk(url, bodies, auth, connections=args.viewers, seconds=args.seconds)
    finally:
        sampling.cancel()
    shares.sample()
    return load, list(await uploads), shares.seconds()


async def _sample_every(shares: CpuShares, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(shares.sample)


async def uploads_started(
    built: Stack, count: int, uploads: asyncio.Future[Any], timeout: float = 300
) -> float:
    started = time.monotonic()
    connection = await asyncpg.connect(built.database_url)
    try:
        while time.monotonic() - started < timeout and not uploads.done():
            asked = await connection.fetchval(
                "SELECT count(*) FROM annotation_mask_group"
                " WHERE model_name = 'bench-load' AND upload_expires_at IS NOT NULL"
            )
            if asked >= count:
                break
            await asyncio.sleep(0.2)
    finally:
        await connection.close()
    return time.monotonic() - started


async def main_async(args: argparse.Namespace, built: Stack, report: Report, work: Path) -> None:
    pngs = mask_pngs(work / "pngs", args.slices)
    async with served(built, args.workers) as base_url:
        started = time.perf_counter()
        small = await seed_trees(base_url, built, args.trees, 2, 50, "1.2.826.0.1.3680043.12.1")
        print(
            f"seeded {args.trees} trees of 2x50 in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        await background_settled(built)
        bodies = [tree_body(tree) for tree in small]
        auth = {"Authorization": f"Bearer {built.reader}"}
        masks = await count_masks(
            f"{base_url}/graphql", bodies[0], auth, ["annotation", "maskGroups", "masks"]
        )
        if masks != 100:
            raise RuntimeError(f"small tree has {masks} masks, expected 100")

        viewers, uploads, cpu = await viewers_with_uploads(args, built, base_url, bodies, pngs)
        print(
            f"{args.viewers} viewers, small trees, {args.uploads} uploads of {args.slices} slices at the same time:"
        )
        print(f"  viewers: {viewers.line()}")
        failed = [item["error"] for item in uploads if "error" in item]
        for item in uploads:
            if "error" in item:
                print(f"  upload FAILED after {item['wall']:.1f} s: {item['error']}")
            else:
                rate = item["uploadedSlices"] / item["seconds"]
                print(
                    f"  upload: {item['uploadedSlices']} slices in {item['seconds']:.1f} s ({rate:.0f} slices/s)"
                )
        workers = f"--workers {args.workers}" if args.workers else "default workers"
        note = f"{args.viewers} closed-loop viewers for {args.seconds:g} s, {workers}, {args.uploads} uploads running"
        report.add("viewers p50", viewers.p50_ms, "ms", note=note)
        report.add("viewers p95", viewers.p95_ms, "ms", at_most=P95_GOAL_MS, note="goal 1")
        report.add("viewers p99", viewers.p99_ms, "ms")
        report.add("viewers requests/s", viewers.per_second, "req/s")
        report.add(
            "viewers errors",
            viewers.errors,
            "",
            at_most=0,
            note="not 200, GraphQL errors, socket errors, timeouts",
        )
        done = [item for item in uploads if "error" not in item]
        report.add(
            "uploads failed", len(failed), "", at_most=0, note="; ".join(failed)[:300] or None
        )
        if done:
            slowest = max(item["seconds"] for item in done)
            total = sum(item["uploadedSlices"] for item in done)
            rates = [item["uploadedSlices"] / item["seconds"] for item in done]
            report.add(
                "upload rate per worker (slowest)",
                min(rates),
                "slices/s",
                note="pacs-masks upload --json: slices / seconds",
            )
            report.add(
                "uploads together",
                total / slowest,
                "slices/s",
                note=f"{total} slices by {len(done)} processes, the slowest in {slowest:.1f} s",
            )
            if slowest < args.seconds:
                note = f"{report.figures[-1].note}; done before the viewers' run ended"
                report.figures[-1].note = note

        available = (os.cpu_count() or 1) * args.seconds
        print(f"  CPU seconds during the viewers' run ({available:.0f} available):")
        for name, spent in cpu.items():
            print(f"    {name:<30} {spent:6.1f} s  ({spent / available:.0%})")
            report.add(
                f"CPU during the run: {name}",
                spent / available * 100,
                "% of the machine",
                note=f"{spent:.1f} of {available:.0f} CPU seconds",
            )

        if not args.no_peers:
            started = time.perf_counter()
            (big,) = await seed_trees(base_url, built, 1, 10, 1000, "1.2.826.0.1.3680043.12.2")
            print(f"seeded a tree of 10x1000 in {time.perf_counter() - started:.0f} s", flush=True)
            await background_settled(built)
            print("beside the peers:")
            await compare(
                report, built, base_url, small, big, seconds=args.peer_seconds, workers=args.workers
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workers_argument(parser)
    parser.add_argument("--viewers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--uploads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--trees", type=int, default=10, help="small trees the viewers rotate over")
    parser.add_argument(
        "--no-peers", action="store_true", help="skip the PostGraphile / json_agg comparisons"
    )
    parser.add_argument("--peer-seconds", type=float, default=15, help="each timed comparison run")
    add_json_argument(parser)
    args = parser.parse_args()
    args.workers = workers_or_default(args.workers)
    report = Report("Viewers at scale, uploads at the same time; peers (goals 1, 2, 3)")
    with stack() as built, tempfile.TemporaryDirectory(prefix="pacs-masks-load-") as work:
        report.context = context(built, args.workers)
        asyncio.run(main_async(args, built, report, Path(work)))
    report.write(args.json)


if __name__ == "__main__":
    main()
