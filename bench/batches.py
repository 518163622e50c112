"""Benchmark: batch mutations and the server's memory, on the real server (`pacs-masks serve`,
a subprocess) with PostgreSQL and SeaweedFS's S3 server over loopback. Server times are
Server-Timing's; beside them the CPU time of the server's event-loop thread
(/proc/PID/task/PID/schedstat), which other processes on a busy machine do not inflate.

- requestMaskUploadUrls for 1000 slices, the first call after start reported apart, and for
  5000 slices (server time, Server-Timing `app`);
- completeMaskUpload for 1000 slices: the server's own work (`app` minus `storage`) beside the
  storage listing it waited on (Server-Timing `storage`);
- a 50,000-slice group end to end (create, URLs in batches of 5000, PUT, complete in batches,
  read) and the server's peak RSS (VmHWM of /proc/PID/status);
- the same batches with CPython's stock garbage collector (GC_TUNING=false), side by side.

    .venv/bin/python bench/batches.py [--repeat 5] [--big 50000] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yarl
from figures import Figure, Report, cpu_model, proc_status_kib
from harness import (
    COMPLETE,
    PUT_CONCURRENCY,
    REQUEST_URLS,
    Client,
    postgres_version,
    serving,
    slices_of,
    stack,
)

BATCH = 5000
TIMINGS = re.compile(r"([a-z]+);dur=([0-9.]+)")
READ_GROUP = """query($id: ID!, $limit: Int, $offset: Int!) {
  maskGroup(id: $id) { id status uploadedSliceCount
    masks(limit: $limit, offset: $offset) { id sliceIndex fileSize checksum } } }"""


@dataclass
class Timed:
    """One answer: its data, Server-Timing in ms by metric (`app`, `storage`) and `cpu`, the
    ms the server's event-loop thread ran meanwhile."""

    data: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def loop_cpu_ms(pid: int) -> float:
    # The first field is the thread's time on a CPU in ns (the main thread runs the loop).
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e6


class Api:
    def __init__(self, client: Client, pid: int, storage: aiohttp.ClientSession) -> None:
        self.client = client
        self.pid = pid
        self.storage = storage

    async def put_all(self, targets: list[dict[str, Any]], bodies: dict[int, bytes]) -> None:
        """PUTs every body to its presigned URL; aiohttp rather than httpx, whose per-request
        CPU on this client side made 50,000 PUTs take many minutes."""
        gate = asyncio.Semaphore(PUT_CONCURRENCY)

        async def put(target: dict[str, Any]) -> None:
            headers = {header["name"]: header["value"] for header in target["headers"]}
            # encoded=True: the signature covers the query exactly as the server wrote it.
            url = yarl.URL(target["url"], encoded=True)
            body = bodies[target["sliceIndex"]]
            async with (
                gate,
                self.storage.request(target["method"], url, data=body, headers=headers) as answer,
            ):
                await answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"PUT {target['filePath']}: {answer.status}")

        await asyncio.gather(*(put(target) for target in targets))

    async def call(self, query: str, variables: dict[str, Any]) -> Timed:
        payload = {"query": query, "variables": variables}
        cpu = loop_cpu_ms(self.pid)
        response = await self.client.http.post("/graphql", json=payload, headers=self.client.auth)
        cpu = loop_cpu_ms(self.pid) - cpu
        body: dict[str, Any] = response.json()
        if response.status_code != 200 or body.get("errors"):
            raise RuntimeError(f"GraphQL failed ({response.status_code}): {response.text[:500]}")
        header = response.headers.get("server-timing", "")
        timings = {name: float(value) for name, value in TIMINGS.findall(header)}
        timings["cpu"] = cpu
        return Timed(body["data"], timings)

    def peak_mib(self) -> float:
        return proc_status_kib(self.pid, "VmHWM") / 1024


async def request_urls(api: Api, group: str, slices: list[dict[str, Any]]) -> Timed:
    return await api.call(REQUEST_URLS, {"groupId": group, "slices": slices})


async def complete(api: Api, group: str, indexes: range) -> Timed:
    done = [{"sliceIndex": i, "width": 512, "height": 512} for i in indexes]
    answer = await api.call(COMPLETE, {"groupId": group, "slices": done})
    if answer.data["completeMaskUpload"]["maskGroup"]["uploadedSliceCount"] < indexes.stop:
        raise RuntimeError(f"group {group}: slices {indexes} were not registered")
    return answer


def study_uid() -> str:
    return f"1.2.826.0.1.3680043.9.{uuid.uuid4().int % 10**12}"


def shown(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1f} ms" for name, value in timings.items())


@dataclass
class Batches:
    """What one server run measured: Timed.timings of each call."""

    first_request: dict[str, float] = field(default_factory=dict)
    request_1000: list[dict[str, float]] = field(default_factory=list)
    request_5000: list[dict[str, float]] = field(default_factory=list)
    complete_1000: list[dict[str, float]] = field(default_factory=list)
    peak_mib: float = 0.0


async def batches(api: Api, repeat: int) -> Batches:
    result = Batches()
    annotation = await api.client.annotation(study_uid())
    for run in range(repeat + 1):
        group = await api.client.group(annotation, 1000)
        slices, bodies = slices_of(0, 1000)
        answer = await request_urls(api, group, slices)
        if run == 0:
            result.first_request = answer.timings
        else:
            result.request_1000.append(answer.timings)
        request = answer.timings
        await api.put_all(answer.data["requestMaskUploadUrls"], bodies)
        answer = await complete(api, group, range(1000))
        if run:
            result.complete_1000.append(answer.timings)
        print(f"  1000 slices: request {shown(request)}; complete {shown(answer.timings)}")
    for _ in range(repeat):
        group = await api.client.group(annotation, BATCH)
        answer = await request_urls(api, group, slices_of(0, BATCH)[0])
        result.request_5000.append(answer.timings)
        print(f"  5000 slices: request {shown(answer.timings)}")
    result.peak_mib = api.peak_mib()
    return result


@dataclass
class EndToEnd:
    seconds: dict[str, float] = field(default_factory=dict)
    peak_mib: float = 0.0
    peak_before_mib: float = 0.0


async def end_to_end(api: Api, count: int) -> EndToEnd:
    """One group of `count` slices the way a worker sends it: URLs and completions in batches
    of 5000, then the masks read back in pages of 5000."""
    result = EndToEnd(peak_before_mib=api.peak_mib())
    annotation = await api.client.annotation(study_uid())
    phases = dict.fromkeys(("create", "request", "put", "complete", "read"), 0.0)
    started = time.perf_counter()
    group = await api.client.group(annotation, count)
    phases["create"] = time.perf_counter() - started
    for start in range(0, count, BATCH):
        size = min(BATCH, count - start)
        slices, bodies = slices_of(start, size)
        began = time.perf_counter()
        answer = await request_urls(api, group, slices)
        put_began = time.perf_counter()
        await api.put_all(answer.data["requestMaskUploadUrls"], bodies)
        complete_began = time.perf_counter()
        done = await complete(api, group, range(start, start + size))
        phases["request"] += put_began - began
        phases["put"] += complete_began - put_began
        phases["complete"] += time.perf_counter() - complete_began
        print(
            f"  {start + size} of {count}: request {shown(answer.timings)}; "
            f"complete {shown(done.timings)}; "
            f"PUTs {complete_began - put_began:.1f} s, RSS peak {api.peak_mib():.0f} MiB",
            flush=True,
        )
    began = time.perf_counter()
    masks = 0
    status = ""
    for offset in range(0, count, BATCH):
        variables = {"id": group, "limit": BATCH, "offset": offset}
        answer = await api.call(READ_GROUP, variables)
        masks += len(answer.data["maskGroup"]["masks"])
        status = answer.data["maskGroup"]["status"]
    phases["read"] = time.perf_counter() - began
    if masks != count or status != "COMPLETE":
        raise RuntimeError(f"read {masks} of {count} masks, group {status}")
    result.seconds = phases
    result.peak_mib = api.peak_mib()
    return result


def serve(env: dict[str, str], workdir: Path, token: str, work: Any) -> Any:
    """Runs `work(api)` against a fresh `pacs-masks serve` with `env`."""

    async def session() -> Any:
        await server.ready()
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as http,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as storage,
        ):
            return await work(Api(Client(http, token), server.process.pid, storage))

    with serving(env, workdir) as server:
        return asyncio.run(session())


def own(timings: dict[str, float]) -> float:
    """The server's own time: what it did not spend waiting for storage."""
    return timings["app"] - timings.get("storage", 0.0)


def metric(calls: list[dict[str, float]], name: str) -> list[float]:
    # No `gc` in Server-Timing: no collection ran during that request.
    missing = 0.0 if name == "gc" else float("nan")
    return [own(call) if name == "own" else call.get(name, missing) for call in calls]


def at_most(name: str, values: list[float], unit: str, goal: float) -> Figure:
    """The worst of `values` against the goal, with the median and the spread beside it."""
    top = max(values)
    note = (
        f"median {statistics.median(values):.1f}, {len(values)} calls" if len(values) > 1 else None
    )
    return Figure(name, round(top, 1), unit, f"<= {goal:g} {unit}", top <= goal, note)


def plain(name: str, values: list[float], unit: str, note: str | None = None) -> Figure:
    return Figure(name, round(statistics.median(values), 1), unit, note=note)


def ratio(name: str, stock: list[float], tuned: list[float]) -> Figure:
    # The fastest run of each: on a shared machine the slower ones measure the neighbours.
    value = min(stock) / min(tuned)
    return Figure(name, round(value, 2), "x", note="stock GC / default, fastest event-loop CPU")


def figures_of(tuned: Batches, stock: Batches, big: EndToEnd | None, count: int) -> list[Figure]:
    first = [tuned.first_request]
    rows = [
        at_most(
            "requestMaskUploadUrls 1000, first call after start", metric(first, "app"), "ms", 50
        ),
        plain("  its event-loop CPU", metric(first, "cpu"), "ms"),
        at_most(
            "requestMaskUploadUrls 1000, later calls", metric(tuned.request_1000, "app"), "ms", 50
        ),
        plain("  their event-loop CPU (median)", metric(tuned.request_1000, "cpu"), "ms"),
        at_most("requestMaskUploadUrls 5000", metric(tuned.request_5000, "app"), "ms", 200),
        plain("  its event-loop CPU (median)", metric(tuned.request_5000, "cpu"), "ms"),
        at_most("completeMaskUpload 1000, own work", metric(tuned.complete_1000, "own"), "ms", 150),
        plain(
            "  storage listing it waited on (median)",
            metric(tuned.complete_1000, "storage"),
            "ms",
            "Server-Timing storage; own work = app - storage",
        ),
        plain(
            "  its event-loop CPU (median)",
            metric(tuned.complete_1000, "cpu"),
            "ms",
            "includes parsing the listing",
        ),
        Figure("server peak RSS after these batches", round(tuned.peak_mib, 1), "MiB"),
    ]
    # Medians only: the stock GC, and the time in GC of either.
    medians = [
        ("stock GC: requestMaskUploadUrls 1000, first call", [stock.first_request], "app"),
        ("stock GC: requestMaskUploadUrls 1000 (median)", stock.request_1000, "app"),
        ("stock GC: requestMaskUploadUrls 5000 (median)", stock.request_5000, "app"),
        ("stock GC: completeMaskUpload 1000, own work (median)", stock.complete_1000, "own"),
        ("requestMaskUploadUrls 5000: time in GC (median)", tuned.request_5000, "gc"),
        ("stock GC: requestMaskUploadUrls 5000: time in GC (median)", stock.request_5000, "gc"),
        ("completeMaskUpload 1000: time in GC (median)", tuned.complete_1000, "gc"),
        ("stock GC: completeMaskUpload 1000: time in GC (median)", stock.complete_1000, "gc"),
    ]
    rows += [plain(name, metric(calls, of), "ms") for name, calls, of in medians]
    rows += [
        ratio(
            "GC tuning: requestMaskUploadUrls 5000 speed-up",
            metric(stock.request_5000, "cpu"),
            metric(tuned.request_5000, "cpu"),
        ),
        ratio(
            "GC tuning: completeMaskUpload 1000 speed-up",
            metric(stock.complete_1000, "cpu"),
            metric(tuned.complete_1000, "cpu"),
        ),
        Figure("stock GC: server peak RSS after these batches", round(stock.peak_mib, 1), "MiB"),
    ]
    if big is not None:
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in big.seconds.items())
        rows += [
            Figure(
                f"{count}-slice group end to end (client wall clock)",
                round(sum(big.seconds.values()), 1),
                "s",
                note=phases,
            ),
            at_most(f"server peak RSS after the {count}-slice group", [big.peak_mib], "MiB", 200),
        ]
    return rows


def print_figures(rows: list[Figure]) -> None:
    width = max(len(row.name) for row in rows)
    for row in rows:
        verdict = "" if row.ok is None else ("ok" if row.ok else "MISSED")
        value = f"{row.value:g} {row.unit}"
        print(
            f"{row.name.ljust(width)}  {value:>11}  {row.goal or '':>11}  {verdict:6}  {row.note or ''}"
        )


def measure(
    env: dict[str, str], workdir: Path, token: str, repeat: int, count: int
) -> tuple[Batches, Batches, EndToEnd | None]:
    async def with_big_group(api: Api) -> tuple[Batches, EndToEnd | None]:
        done = await batches(api, repeat)
        return done, (await end_to_end(api, count) if count else None)

    async def only_batches(api: Api) -> Batches:
        return await batches(api, repeat)

    # A fresh server for each; the stock one first, so the default one meets the larger tables.
    print("server with CPython's stock GC (GC_TUNING=false) ...", flush=True)
    stock = serve({**env, "GC_TUNING": "false"}, workdir, token, only_batches)
    print("server as configured by default ...", flush=True)
    tuned, big = serve(env, workdir, token, with_big_group)
    return tuned, stock, big


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", help="an existing, empty PostgreSQL database")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--big", type=int, default=50_000, help="slices of the big group; 0 skips")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()

    with stack(args.database_url) as built:
        context: dict[str, Any] = {
            "machine": platform.platform(),
            "python": f"{sys.version.split()[0]} ({platform.python_implementation()})",
            "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
            "load average": " ".join(f"{load:.2f}" for load in os.getloadavg()),
            "postgresql": asyncio.run(postgres_version(built.database_url)),
            "storage": "SeaweedFS S3 over loopback",
            "repeat": args.repeat,
        }
        for key, value in context.items():
            print(f"{key + ':':14}{value}")
        tuned, stock, big = measure(built.env, built.workdir, built.uploader, args.repeat, args.big)
    rows = figures_of(tuned, stock, big, args.big)
    print()
    print_figures(rows)
    report = Report("Batches: upload URLs, completion, a big group's memory, the GC")
    report.figures, report.context = rows, context
    report.write(args.json)


if __name__ == "__main__":
    main()
