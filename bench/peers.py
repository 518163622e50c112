"""Benchmark: our tree query beside two peers on the same PostgreSQL database and the same
selection (annotation -> maskGroups -> masks), measured side by side in one run (issue 12,
goals 2 and 3):

- PostGraphile 4, a GraphQL server that compiles the whole query into one SQL statement
  (the npm package, installed at bench time into ~/.cache/pacs-masks-bench, never the repo);
- the raw-SQL bound: one statement returning the same tree as JSON (json_agg), over asyncpg.

Small trees (2 groups x 50 masks) at concurrency 8: p95 and requests/s, ours and PostGraphile's.
A big tree (10 groups x 1000 masks) at concurrency 1: the median time of ours, PostGraphile's
and the json_agg statement's, and the ratios. wrk is the HTTP load generator (its own process).
The goals compare the same selection: every column of the tree, without our `viewUrl` (a URL
signed per mask in Python; the database has no such column). Ours with `viewUrl` as well, the
tree the web viewer asks for, is measured beside them and reported for information.

    .venv/bin/python bench/peers.py [--workers N] [--seconds 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from figures import Report, add_json_argument, machine
from harness import (
    PLAIN_TREE,
    Stack,
    Tree,
    add_workers_argument,
    background_settled,
    count_masks,
    free_port,
    postgres_version,
    run_wrk,
    seed_trees,
    served,
    stack,
    stop,
    tree_body,
    workers_or_default,
    wrk_version,
)

POSTGRAPHILE = "postgraphile@4"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pacs-masks-bench"

# PostGraphile's names for our tables (`--simple-collections only`: plain lists, as ours).
# Deleted groups are hidden as our server hides them; masks in slice order as ours.
PEER_TREE = """query($id: Int!) {
  annotationAnnotationById(id: $id) {
    id annotationMaskGroupsByAnnotationIdList(condition: {deletedAt: null}, orderBy: ID_ASC) {
      id status uploadedSliceCount
      annotationMasksByMaskGroupIdList(orderBy: [SLICE_INDEX_ASC, LABEL_NAME_ASC]) {
        id sliceIndex labelName filePath fileSize checksum mimeType } } } }"""
PEER_PATH = [
    "annotationAnnotationById",
    "annotationMaskGroupsByAnnotationIdList",
    "annotationMasksByMaskGroupIdList",
]

JSON_TREE = """
SELECT json_build_object('id', a.id, 'maskGroups', COALESCE((
  SELECT json_agg(json_build_object(
    'id', g.id, 'status', g.status, 'uploadedSliceCount', g.uploaded_slice_count,
    'masks', COALESCE((
      SELECT json_agg(json_build_object(
        'id', m.id, 'sliceIndex', m.slice_index, 'labelName', m.label_name,
        'filePath', m.file_path, 'fileSize', m.file_size, 'checksum', m.checksum,
        'mimeType', m.mime_type) ORDER BY m.slice_index, m.label_name)
      FROM annotation_mask m WHERE m.mask_group_id = g.id), '[]'::json)) ORDER BY g.id)
  FROM annotation_mask_group g WHERE g.annotation_id = a.id AND g.deleted_at IS NULL),
  '[]'::json))
FROM annotation_annotation a WHERE a.id = $1
"""


def install_postgraphile() -> tuple[Path, str]:
    """`npm install postgraphile@4` into the cache folder once; the CLI and its version."""
    folder = CACHE / "postgraphile"
    cli = folder / "node_modules" / "postgraphile" / "cli.js"
    if not cli.exists():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"installing {POSTGRAPHILE} into {folder} ...", flush=True)
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-save", POSTGRAPHILE],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not cli.exists():
            raise SystemExit(f"npm install {POSTGRAPHILE} failed: {done.stderr[-2000:]}")
    package = json.loads((folder / "node_modules" / "postgraphile" / "package.json").read_text())
    return cli, str(package["version"])


def node_version() -> str:
    return subprocess.run(
        ["node", "--version"], check=False, capture_output=True, text=True
    ).stdout.strip()


@asynccontextmanager
async def postgraphile(database_url: str, workdir: Path) -> AsyncIterator[tuple[str, str]]:
    """PostGraphile 4 on a free loopback port: its /graphql URL and its version."""
    cli, version = install_postgraphile()
    port = free_port()
    command = ["node", str(cli), "--connection", database_url, "--schema", "public"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--simple-collections", "only"]
    command += ["--disable-query-log", "--disable-default-mutations"]
    log = workdir / "postgraphile.log"
    env = {**os.environ, "NODE_ENV": "production"}
    with log.open("wb") as out:
        # Started once, before any load: the blocking start does not disturb a measurement.
        process = subprocess.Popen(  # noqa: ASYNC220
            command, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/graphql"
    try:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostGraphile did not start: {log.read_text()[-2000:]}")
                try:
                    answer = await http.post(url, json={"query": "{ __typename }"})
                    if answer.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        yield url, version
    finally:
        stop(process)


def peer_body(tree: Tree) -> str:
    return json.dumps({"query": PEER_TREE, "variables": {"id": tree.db_id}})


async def json_agg_ms(database_url: str, tree: Tree, seconds: float) -> tuple[list[float], int]:
    """The bound: the statement run back to back over one connection (times in ms, size)."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.fetchval(JSON_TREE, tree.db_id)  # prepared once, as a server would
        times: list[float] = []
        size = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end or len(times) < 5:
            started = time.perf_counter()
            text = await connection.fetchval(JSON_TREE, tree.db_id)
            times.append((time.perf_counter() - started) * 1000)
            size = len(text)
        masks = sum(len(group["masks"]) for group in json.loads(text)["maskGroups"])
        if masks != tree.groups * tree.masks:
            raise RuntimeError(f"json_agg tree has {masks} masks")
        return times, size
    finally:
        await connection.close()


async def compare(
    report: Report,
    built: Stack,
    ours_url: str,
    small: list[Tree],
    big: Tree,
    *,
    seconds: float,
    workers: int | None,
) -> None:
    """Both comparisons against a running server of ours; figures go into `report`."""
    auth = {"Authorization": f"Bearer {built.reader}"}
    ours = f"{ours_url}/graphql"
    async with postgraphile(built.database_url, built.workdir) as (peer, version):
        report.context["postgraphile"] = version
        report.context["node"] = node_version()
        # Both answer the whole tree before anything is timed.
        for tree in [*small[:1], big]:
            expected = tree.groups * tree.masks
            got = await count_masks(
                ours, tree_body(tree), auth, ["annotation", "maskGroups", "masks"]
            )
            peer_got = await count_masks(peer, peer_body(tree), {}, PEER_PATH)
            if got != expected or peer_got != expected:
                raise RuntimeError(
                    f"trees differ: ours {got}, PostGraphile {peer_got}, want {expected}"
                )

        ours_bodies = [tree_body(tree, PLAIN_TREE) for tree in small]
        viewer_bodies = [tree_body(tree) for tree in small]
        peer_bodies = [peer_body(tree) for tree in small]
        # Warm both (connections, caches, JIT) before the timed runs.
        await run_wrk(ours, viewer_bodies, auth, connections=2, seconds=2)
        await run_wrk(peer, peer_bodies, {}, connections=2, seconds=2)
        mine = await run_wrk(ours, ours_bodies, auth, connections=8, seconds=seconds)
        print(f"  small trees, concurrency 8, ours:         {mine.line()}", flush=True)
        theirs = await run_wrk(peer, peer_bodies, {}, connections=8, seconds=seconds)
        print(f"  small trees, concurrency 8, PostGraphile: {theirs.line()}", flush=True)
        viewer = await run_wrk(ours, viewer_bodies, auth, connections=8, seconds=seconds)
        print(f"  small trees, concurrency 8, ours + viewUrl: {viewer.line()}", flush=True)
        note = f"our server with --workers {workers}" if workers else "our server, default workers"
        report.add("small tree c=8: ours p95", mine.p95_ms, "ms", note=note)
        report.add("small tree c=8: PostGraphile p95", theirs.p95_ms, "ms", note="one Node process")
        report.add("small tree c=8: ours requests/s", mine.per_second, "req/s")
        report.add("small tree c=8: PostGraphile requests/s", theirs.per_second, "req/s")
        report.add(
            "small tree c=8: ours + viewUrl p95",
            viewer.p95_ms,
            "ms",
            note="the web viewer's tree: a URL signed per mask as well",
        )
        report.add("small tree c=8: ours + viewUrl requests/s", viewer.per_second, "req/s")
        report.add(
            "small tree c=8: errors (ours + PostGraphile)",
            mine.errors + theirs.errors + viewer.errors,
            "",
            at_most=0,
        )
        report.add(
            "small tree c=8: p95 ours / PostGraphile",
            mine.p95_ms / theirs.p95_ms,
            "x",
            at_most=1.0,
            note="goal 2: p95 at least as good as PostGraphile's",
        )
        report.add(
            "small tree c=8: requests/s ours / PostGraphile",
            mine.per_second / theirs.per_second,
            "x",
            at_least=1.0,
            note="goal 2: throughput at least as good as PostGraphile's",
        )

        big_body = tree_body(big, PLAIN_TREE)
        big_ours = await run_wrk(ours, [big_body], auth, connections=1, seconds=seconds)
        print(
            f"  tree {big.groups}x{big.masks}, concurrency 1, ours:         {big_ours.line()}",
            flush=True,
        )
        big_peer = await run_wrk(peer, [peer_body(big)], {}, connections=1, seconds=seconds)
        print(
            f"  tree {big.groups}x{big.masks}, concurrency 1, PostGraphile: {big_peer.line()}",
            flush=True,
        )
        big_viewer = await run_wrk(ours, [tree_body(big)], auth, connections=1, seconds=seconds)
        print(
            f"  tree {big.groups}x{big.masks}, concurrency 1, ours + viewUrl: {big_viewer.line()}",
            flush=True,
        )
    bound, size = await json_agg_ms(built.database_url, big, seconds)
    bound_ms = statistics.median(bound)
    print(
        f"  tree {big.groups}x{big.masks}, json_agg over asyncpg: median {bound_ms:.1f} ms, {len(bound)} runs, {size / 1e6:.2f} MB"
    )
    name = f"tree {big.groups}x{big.masks} c=1"
    report.add(f"{name}: ours median", big_ours.p50_ms, "ms", note="client wall clock (wrk)")
    report.add(f"{name}: PostGraphile median", big_peer.p50_ms, "ms")
    report.add(
        f"{name}: ours + viewUrl median",
        big_viewer.p50_ms,
        "ms",
        note="the web viewer's tree: a URL signed per mask as well",
    )
    report.add(
        f"{name}: json_agg median",
        bound_ms,
        "ms",
        note=f"one SQL statement over asyncpg, {size / 1e6:.2f} MB of JSON",
    )
    report.add(
        f"{name}: ours / PostGraphile",
        big_ours.p50_ms / big_peer.p50_ms,
        "x",
        at_most=1.0,
        note="goal 3: faster than PostGraphile",
    )
    report.add(
        f"{name}: ours / json_agg",
        big_ours.p50_ms / bound_ms,
        "x",
        at_most=2.5,
        note="goal 3: within 2.5x of the raw-SQL JSON bound",
    )
    report.add(
        f"{name}: errors", big_ours.errors + big_peer.errors + big_viewer.errors, "", at_most=0
    )


async def seed_for_comparison(
    base_url: str, built: Stack, small_count: int
) -> tuple[list[Tree], Tree]:
    started = time.perf_counter()
    small = await seed_trees(base_url, built, small_count, 2, 50, "1.2.826.0.1.3680043.12.1")
    (big,) = await seed_trees(base_url, built, 1, 10, 1000, "1.2.826.0.1.3680043.12.2")
    print(
        f"seeded {small_count} trees of 2x50 and one of 10x1000 in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return small, big


async def main_async(args: argparse.Namespace, built: Stack, report: Report) -> None:
    async with served(built, args.workers) as base_url:
        small, big = await seed_for_comparison(base_url, built, args.trees)
        await background_settled(built)
        await compare(
            report, built, base_url, small, big, seconds=args.seconds, workers=args.workers
        )


def context(built: Stack, workers: int | None) -> dict[str, Any]:
    return {
        **machine(),
        "postgresql": asyncio.run(postgres_version(built.database_url)),
        "s3": f"SeaweedFS {built.seaweed_version}",
        "wrk": wrk_version(),
        "workers": workers or "serve's default (this branch's serve has no --workers)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workers_argument(parser)
    parser.add_argument("--seconds", type=float, default=15, help="each timed run")
    parser.add_argument("--trees", type=int, default=10, help="small trees to rotate over")
    add_json_argument(parser)
    args = parser.parse_args()
    args.workers = workers_or_default(args.workers)
    report = Report("Tree query beside PostGraphile 4 and the json_agg bound (goals 2 and 3)")
    with stack() as built:
        report.context = context(built, args.workers)
        asyncio.run(main_async(args, built, report))
    report.write(args.json)


if __name__ == "__main__":
    main()
