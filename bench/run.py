"""Benchmark: the real server (a subprocess, so its peak memory can be read) on PostgreSQL and
moto's S3 server over loopback. Prints server times (Server-Timing), client wall clock and the
server's peak RSS against their goals.

    .venv/bin/python bench/run.py [--database-url postgresql://...] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import logging
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from figures import Report, add_json_argument, machine
from moto.server import ThreadedMotoServer

from app.config import Settings
from app.main import open_storage

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
BIN = Path(sys.executable).parent
BUCKET = "pacs-masks-bench"
PUT_CONCURRENCY = 32
TIMING = re.compile(r"app;dur=([0-9.]+)")

CREATE_ANNOTATION = """mutation($input: CreateAnnotationInput!) {
  createAnnotation(input: $input) { id } }"""
CREATE_GROUP = """mutation($input: CreateMaskGroupInput!) {
  createMaskGroup(input: $input) { id sliceCount status } }"""
REQUEST_URLS = """mutation($groupId: ID!, $slices: [SliceUploadInput!]!) {
  requestMaskUploadUrls(groupId: $groupId, slices: $slices, ttlSeconds: 600) {
    sliceIndex filePath url method headers { name value } expiresAt } }"""
COMPLETE = """mutation($groupId: ID!, $slices: [CompletedSliceInput!]!) {
  completeMaskUpload(groupId: $groupId, slices: $slices) {
    maskGroup { id status uploadedSliceCount missingSliceIndexes totalBytes }
    masks { id sliceIndex labelName checksum } } }"""
TREE = """query($id: ID!) {
  annotation(id: $id) {
    id maskGroups { id status uploadedSliceCount
      masks { id sliceIndex labelName filePath fileSize checksum mimeType viewUrl } } } }"""


def png_bytes(seed: int = 0, size: int = 64) -> bytes:
    """A small body that starts like a PNG; storage never decodes it."""
    return b"\x89PNG\r\n\x1a\n" + hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)


def content_md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


class Client:
    """GraphQL over HTTP; keeps the server time and size of the last answer."""

    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self.http = http
        # Only GraphQL calls carry the token: a presigned URL is its own authorisation.
        self.auth = {"Authorization": f"Bearer {token}"}
        self.server_ms = 0.0
        self.size = 0
        self.phases = (0.0, 0.0, 0.0)  # wall seconds of the last upload: request, PUTs, complete
        self.last_keys: list[str] = []  # object keys of the last upload

    async def data(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        payload = {"query": query, "variables": variables}
        response = await self.http.post("/graphql", json=payload, headers=self.auth)
        body: dict[str, Any] = response.json()
        if response.status_code != 200 or body.get("errors"):
            raise RuntimeError(f"GraphQL failed ({response.status_code}): {response.text[:500]}")
        match = TIMING.search(response.headers.get("server-timing", ""))
        self.server_ms = float(match.group(1)) if match else float("nan")
        self.size = len(response.content)
        data: dict[str, Any] = body["data"]
        return data

    async def annotation(self, study: str) -> str:
        variables = {"input": {"studyInstanceUid": study, "seriesInstanceUid": f"{study}.1"}}
        data = await self.data(CREATE_ANNOTATION, variables)
        return str(data["createAnnotation"]["id"])

    async def group(self, annotation_id: str, slice_count: int) -> str:
        variables = {"input": {"annotationId": annotation_id, "sliceCount": slice_count}}
        data = await self.data(CREATE_GROUP, variables)
        return str(data["createMaskGroup"]["id"])

    async def upload(self, group_id: str, count: int) -> tuple[float, float]:
        """request URLs, PUT every slice, complete; the server ms of request and complete."""
        bodies = {index: png_bytes(index) for index in range(count)}
        slices = [
            {"sliceIndex": i, "fileSize": len(body), "contentMd5": content_md5(body)}
            for i, body in bodies.items()
        ]
        started = time.perf_counter()
        data = await self.data(REQUEST_URLS, {"groupId": group_id, "slices": slices})
        request_ms, requested = self.server_ms, time.perf_counter()
        data_targets = data["requestMaskUploadUrls"]
        await self.put_all(data_targets, bodies)
        done = [{"sliceIndex": i, "width": 512, "height": 512} for i in bodies]
        put = time.perf_counter()
        data = await self.data(COMPLETE, {"groupId": group_id, "slices": done})
        self.phases = (requested - started, put - requested, time.perf_counter() - put)
        self.last_keys = [target["filePath"] for target in data_targets]
        if data["completeMaskUpload"]["maskGroup"]["uploadedSliceCount"] != count:
            raise RuntimeError(f"group {group_id} is not complete: {data}")
        return request_ms, self.server_ms

    async def put_all(self, targets: list[dict[str, Any]], bodies: dict[int, bytes]) -> None:
        gate = asyncio.Semaphore(PUT_CONCURRENCY)

        async def put(target: dict[str, Any]) -> None:
            headers = {header["name"]: header["value"] for header in target["headers"]}
            async with gate:
                response = await self.http.request(
                    target["method"],
                    target["url"],
                    content=bodies[target["sliceIndex"]],
                    headers=headers,
                )
            if response.status_code != 200:
                raise RuntimeError(f"PUT {target['filePath']}: {response.status_code}")

        await asyncio.gather(*(put(target) for target in targets))


def start_moto() -> tuple[ThreadedMotoServer, str]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(20)
    if starter.is_alive():
        raise RuntimeError("moto server did not start")
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def server_env(database_url: str, moto_url: str) -> dict[str, str]:
    # Nothing of the developer's own configuration may leak in: drop every Settings variable.
    names = {name.upper() for name in Settings.model_fields} | {"AWS_SESSION_TOKEN"}
    env = {key: value for key, value in os.environ.items() if key.upper() not in names}
    env.update(
        DATABASE_URL=database_url,
        STORAGE_PROVIDER="s3",
        S3_ENDPOINT_URL=moto_url,
        S3_BUCKET_NAME=BUCKET,
        S3_FORCE_PATH_STYLE="true",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        LOG_LEVEL="warning",
    )
    return env


def run_cli(cli: str, env: dict[str, str], cwd: str, *args: str) -> str:
    command = [cli, *args]
    done = subprocess.run(command, check=False, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pacs-masks {args[0]} failed: {(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_ready(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=base_url, timeout=1) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not answer /healthz within 30 s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


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


async def admin_execute(sql: str) -> None:
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def postgres_version(database_url: str) -> str:
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        return str(await connection.fetchval("SELECT version()"))
    finally:
        await connection.close()


def storage_settings(moto_url: str) -> Settings:
    return Settings(
        _env_file=None,
        storage_provider="s3",
        s3_bucket_name=BUCKET,
        s3_endpoint_url=moto_url,
        s3_public_endpoint_url=None,
        s3_force_path_style=True,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


async def create_bucket(moto_url: str) -> None:
    storage = await open_storage(storage_settings(moto_url))
    try:
        await storage.ensure_bucket([])
    finally:
        await storage.aclose()


async def storage_rows(moto_url: str, keys: list[str], repeat: int) -> list[Row]:
    """What completion waits on (the storage listing) and what presigning costs, measured
    here with the server's own storage code, to read the server's figures against."""
    storage = await open_storage(storage_settings(moto_url))
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


async def bench(
    port: int, process: subprocess.Popen[bytes], log: Path, token: str, repeat: int
) -> tuple[list[Row], list[str]]:
    base_url = f"http://127.0.0.1:{port}"
    await wait_ready(base_url, process, log)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        client = Client(http, token)
        rows = await run(client, repeat, process.pid)
        return rows, client.last_keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", help="an existing, empty PostgreSQL database")
    parser.add_argument("--repeat", type=int, default=5)
    add_json_argument(parser)
    args = parser.parse_args()

    created = None
    database_url: str = args.database_url
    if database_url is None:
        created = f"pacs_masks_bench_{uuid.uuid4().hex[:12]}"
        asyncio.run(admin_execute(f'CREATE DATABASE "{created}"'))
        database_url = f"{ADMIN_URL.rsplit('/', 1)[0]}/{created}"
    moto: ThreadedMotoServer | None = None
    process: subprocess.Popen[bytes] | None = None
    workdir = tempfile.TemporaryDirectory(prefix="pacs-masks-bench-")
    try:
        print(f"machine:    {platform.platform()}")
        print(f"python:     {sys.version.split()[0]} ({platform.python_implementation()})")
        print(f"cpu:        {cpu_model()}, {os.cpu_count()} cores")
        postgresql = asyncio.run(postgres_version(database_url))
        print(f"postgresql: {postgresql}")
        print(f"repeat:     {args.repeat}\n")

        moto, moto_url = start_moto()
        asyncio.run(create_bucket(moto_url))
        env = server_env(database_url, moto_url)
        cli = str(BIN / "pacs-masks")
        # The working directory is empty, so no .env file is read and no var/ is created here.
        run_cli(cli, env, workdir.name, "migrate")
        # An UPLOADER token, as an inference worker has; the secret is the last line printed.
        token = run_cli(
            cli, env, workdir.name, "create-token", "--user", "bench", "--role", "uploader"
        )
        token = token.strip().splitlines()[-1]
        port = free_port()
        log = Path(workdir.name) / "server.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [cli, "serve", "--port", str(port)],
                env=env,
                cwd=workdir.name,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        rows, keys = asyncio.run(bench(port, process, log, token, args.repeat))
        rows += asyncio.run(storage_rows(moto_url, keys, args.repeat))
        print()
        print_table(rows)
        context = {**machine(), "postgresql": postgresql, "s3": "moto (in the bench process)"}
        context["repeat"] = args.repeat
        report_of(rows, context).write(args.json)
    finally:
        if process is not None:
            stop(process)
        if moto is not None:
            moto.stop()
        workdir.cleanup()
        if created is not None:
            asyncio.run(admin_execute(f'DROP DATABASE IF EXISTS "{created}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
