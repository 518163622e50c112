"""Benchmark: many viewers reading small trees, the per-request overhead of a GraphQL read.

The real server (`pacs-masks serve`, a subprocess) on PostgreSQL and moto's S3 server; an
annotation of 2 groups x 50 completed masks uploaded through the API; then N closed-loop
clients (this process, aiohttp: far cheaper per request than httpx, so the load generator
takes less of the CPU it shares with the server) send the README's step-6 tree query for a
fixed time each. Prints requests/s, client latency p50/p95/p99, the server's own time
(Server-Timing) and requests per second of server CPU time (the per-core figure: it does not
depend on what else the machine runs; with `--workers N`, of every worker process).

    .venv/bin/python bench/small_trees.py [--concurrency 8,50] [--seconds 15] [--json PATH]
        [--query readme|viewer] [--workers N] [--py-spy out.svg]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from harness import (
    BIN,
    TIMING,
    TREE,
    Client,
    Server,
    host_context,
    print_context,
    serving,
    stack,
)

README = Path(__file__).resolve().parent.parent / "README.md"
GROUPS = 2
MASKS_PER_GROUP = 50
WARMUP_SECONDS = 2.0
# Goals of issue 12: 50 viewers at p95 <= 200 ms; 4x the requests per CPU second of before.
P95_GOAL_MS = 200.0
BASELINE_PER_CPU_SECOND = 63.0


def tree_query(name: str) -> str:
    """readme: the README's step-6 query (a presigned downloadUrl per mask as well);
    viewer: bench/harness.py's TREE, what the web viewer asks (viewUrl only)."""
    return readme_tree_query() if name == "readme" else " ".join(TREE.split())


def readme_tree_query() -> str:
    """Step 6 of the README's upload sequence: the query inside its jq command."""
    match = re.search(r'query: "(query\(\$id: ID!\) \{ annotation.*?)",\n', README.read_text())
    if match is None:
        raise RuntimeError("README has no step-6 tree query")
    return match.group(1)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (`serve --workers N` runs its workers as child processes)."""
    found = [pid]
    for process in found:
        for task in Path(f"/proc/{process}/task").glob("*/children"):
            found.extend(int(child) for child in task.read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants, from /proc."""
    ticks = 0
    for process in process_tree(pid):
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += sum(int(value) for value in fields[11:13])  # utime stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def seed(base_url: str, token: str) -> str:
    """An annotation with GROUPS complete groups of MASKS_PER_GROUP masks; its id."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        client = Client(http, token)
        annotation = await client.annotation("1.2.826.0.1.3680043.9.7")
        for _ in range(GROUPS):
            await client.upload(await client.group(annotation, MASKS_PER_GROUP), MASKS_PER_GROUP)
        return annotation


def profile(pid: int, seconds: float, path: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the server while it is measured: a flame graph (.svg), speedscope
    (.json) or collapsed stacks (any other name)."""
    formats = {".svg": "flamegraph", ".json": "speedscope"}
    command = [str(BIN / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds))]
    command += ["--rate", "250", "--format", formats.get(path.suffix, "raw"), "-o", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def drive(
    base_url: str,
    token: str,
    annotation: str,
    concurrency: int,
    seconds: float,
    pid: int,
    query: str,
    profile_path: Path | None = None,
) -> dict[str, float]:
    """`concurrency` clients, each sending the next request when its answer is in."""
    body = json.dumps({"query": query, "variables": {"id": annotation}}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    server_ms: list[float] = []
    errors = 0
    measuring = False
    stop_at = 0.0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, connector=connector) as session:

        async def viewer() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                async with session.post("/graphql", data=body, headers=headers) as response:
                    payload = await response.read()
                    timing = response.headers.get("server-timing", "")
                    status = response.status
                elapsed = (time.perf_counter() - started) * 1000
                if not measuring:
                    continue
                masks = 0
                if status == 200:
                    answer = json.loads(payload)
                    if not answer.get("errors"):
                        groups = answer["data"]["annotation"]["maskGroups"]
                        masks = sum(len(group["masks"]) for group in groups)
                if masks != GROUPS * MASKS_PER_GROUP:
                    errors += 1
                    continue
                latencies.append(elapsed)
                match = TIMING.search(timing)
                if match:
                    server_ms.append(float(match.group(1)))

        stop_at = time.perf_counter() + WARMUP_SECONDS + seconds
        tasks = [asyncio.create_task(viewer()) for _ in range(concurrency)]
        await asyncio.sleep(WARMUP_SECONDS)
        measuring = True
        spy = profile(pid, seconds, profile_path) if profile_path else None
        cpu_before, wall_before = cpu_seconds(pid), time.perf_counter()
        own_before = time.process_time()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - wall_before
        server_cpu = cpu_seconds(pid) - cpu_before
        client_cpu = time.process_time() - own_before
    if spy is not None:
        spy.wait()
    count = len(latencies)
    if count == 0:
        raise RuntimeError(f"no successful request at concurrency {concurrency} ({errors} errors)")
    return {
        "requests": count,
        "errors": errors,
        "rps": count / wall,
        "per_cpu_second": count / server_cpu if server_cpu else float("nan"),
        "server_cpu_share": server_cpu / wall,
        "client_cpu_share": client_cpu / wall,
        "p50": percentile(latencies, 0.50),
        "p95": percentile(latencies, 0.95),
        "p99": percentile(latencies, 0.99),
        "server_p50": statistics.median(server_ms) if server_ms else float("nan"),
        "server_p95": percentile(server_ms, 0.95) if server_ms else float("nan"),
    }


def figures_of(concurrency: int, result: dict[str, float]) -> list[dict[str, Any]]:
    prefix = f"small tree c={concurrency}"
    per_cpu_goal = 4 * BASELINE_PER_CPU_SECOND
    rows: list[dict[str, Any]] = [
        {"name": f"{prefix} requests/s", "value": result["rps"], "unit": "req/s"},
        {
            "name": f"{prefix} requests per server CPU second",
            "value": result["per_cpu_second"],
            "unit": "req/cpu-s",
            "goal": f">= {per_cpu_goal:.0f} (4x the 63 req/s of one saturated core before)",
            "ok": result["per_cpu_second"] >= per_cpu_goal,
        },
        {"name": f"{prefix} p50", "value": result["p50"], "unit": "ms"},
        {
            "name": f"{prefix} p95",
            "value": result["p95"],
            "unit": "ms",
            "goal": f"<= {P95_GOAL_MS:.0f} ms" if concurrency >= 50 else None,
            "ok": result["p95"] <= P95_GOAL_MS if concurrency >= 50 else None,
            "note": "goal 1 asks it of 50 viewers on 2 workers" if concurrency >= 50 else None,
        },
        {"name": f"{prefix} p99", "value": result["p99"], "unit": "ms"},
        {"name": f"{prefix} server time p50", "value": result["server_p50"], "unit": "ms"},
        {"name": f"{prefix} server time p95", "value": result["server_p95"], "unit": "ms"},
        {
            "name": f"{prefix} errors",
            "value": result["errors"],
            "unit": "requests",
            "goal": "0",
            "ok": result["errors"] == 0,
        },
    ]
    for row in rows:
        row.setdefault("goal", None)
        row.setdefault("ok", None)
        row.setdefault("note", None)
    return rows


def print_result(concurrency: int, result: dict[str, float]) -> None:
    print(
        f"  concurrency {concurrency:>3}: {result['rps']:7.1f} req/s, "
        f"{result['per_cpu_second']:6.1f} req per server CPU s "
        f"(server {result['server_cpu_share']:.0%} of a core, "
        f"load generator {result['client_cpu_share']:.0%}); "
        f"p50 {result['p50']:.1f} ms, p95 {result['p95']:.1f} ms, p99 {result['p99']:.1f} ms; "
        f"server time p50 {result['server_p50']:.1f} ms, p95 {result['server_p95']:.1f} ms; "
        f"{result['requests']:.0f} requests, {result['errors']:.0f} errors"
    )


async def bench(
    server: Server,
    tokens: tuple[str, str],
    levels: list[int],
    seconds: float,
    query: str,
    profile_path: Path | None,
) -> list[tuple[int, dict[str, float]]]:
    await server.ready()
    uploader, reader = tokens
    annotation = await seed(server.url, uploader)
    results = []
    for index, concurrency in enumerate(levels):
        path = profile_path if index == 0 else None
        result = await drive(
            server.url, reader, annotation, concurrency, seconds, server.process.pid, query, path
        )
        print_result(concurrency, result)
        results.append((concurrency, result))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", help="an existing, empty PostgreSQL database")
    parser.add_argument(
        "--concurrency", default="8,50", help="comma-separated client counts (default 8,50)"
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per level")
    parser.add_argument(
        "--query",
        choices=["readme", "viewer"],
        default="readme",
        help="readme: the README's step-6 query (default); viewer: bench/harness.py's TREE",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument(
        "--py-spy",
        type=Path,
        dest="py_spy",
        help="profile the server during the first level (py-spy: .svg, .json or raw stacks)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="serve --workers N (where serve has it)"
    )
    args = parser.parse_args()
    if args.py_spy is not None and not (BIN / "py-spy").exists():
        parser.error(f"--py-spy needs py-spy in {BIN}: {BIN / 'pip'} install py-spy")
    workers = ["--workers", str(args.workers)] if args.workers > 1 else []
    levels = [int(level) for level in args.concurrency.split(",")]

    with stack(args.database_url, moto=True) as built:
        context: dict[str, Any] = {
            **host_context(built.database_url),
            "tree": f"{GROUPS} groups x {MASKS_PER_GROUP} masks, {args.query} query",
            "seconds": args.seconds,
            "workers": args.workers,
        }
        print_context(context)
        print()
        with serving(built.env, built.workdir, *workers) as server:
            results = asyncio.run(
                bench(
                    server,
                    (built.uploader, built.reader),
                    levels,
                    args.seconds,
                    tree_query(args.query),
                    args.py_spy,
                )
            )
    if args.json:
        figures = [row for level, result in results for row in figures_of(level, result)]
        report = {"title": "Small trees: many viewers", "figures": figures, "context": context}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
