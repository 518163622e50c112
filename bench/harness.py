"""What the bench scripts share: the API client of a worker, `pacs-masks serve` as a
subprocess (started, awaited, stopped), a fresh PostgreSQL database, S3 storage (moto's server in
this process, or SeaweedFS started as the tests start it), and for the load and peer benchmarks
a whole stack with trees seeded through the API as workers upload them, and wrk as the load
generator in its own process (a C program: it does not take the CPU the server is measured
with, as a Python client on this 2-core machine would).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
from figures import cpu_model
from moto.server import ThreadedMotoServer
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from storage_servers import running_seaweed, s3_settings

from app.config import Settings
from app.main import open_storage

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
BIN = Path(sys.executable).parent
CLI = str(BIN / "pacs-masks")
BUCKET = "pacs-masks-bench"
MOTO_KEY = "testing"  # moto takes any key; the access key and the secret alike

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
# TREE without viewUrl: the selection a peer without our URL signing can answer as well.
PLAIN_TREE = TREE.replace(" viewUrl", "")


def png_bytes(seed: int = 0, size: int = 64) -> bytes:
    """A small body that starts like a PNG; storage never decodes it."""
    return b"\x89PNG\r\n\x1a\n" + hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)


def content_md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


def slices_of(start: int, count: int) -> tuple[list[dict[str, Any]], dict[int, bytes]]:
    """Slices `start`.. as requestMaskUploadUrls takes them, and their bodies by index."""
    bodies = {index: png_bytes(index) for index in range(start, start + count)}
    slices = [
        {"sliceIndex": i, "fileSize": len(body), "contentMd5": content_md5(body)}
        for i, body in bodies.items()
    ]
    return slices, bodies


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
        slices, bodies = slices_of(0, count)
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


def run_cli(env: dict[str, str], cwd: str | Path, *args: str) -> str:
    command = [CLI, *args]
    done = subprocess.run(command, check=False, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pacs-masks {args[0]} failed: {(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def create_token(env: dict[str, str], cwd: str | Path, user: str, role: str) -> str:
    """A new API token's secret (the last line `create-token` prints)."""
    output = run_cli(env, cwd, "create-token", "--user", user, "--role", role)
    return output.strip().splitlines()[-1]


def server_env(
    database_url: str, s3_url: str, access_key: str = MOTO_KEY, secret_key: str = MOTO_KEY
) -> dict[str, str]:
    # Nothing of the developer's own configuration may leak in: drop every Settings variable.
    names = {name.upper() for name in Settings.model_fields} | {"AWS_SESSION_TOKEN"}
    env = {key: value for key, value in os.environ.items() if key.upper() not in names}
    env.update(
        DATABASE_URL=database_url,
        STORAGE_PROVIDER="s3",
        S3_ENDPOINT_URL=s3_url,
        S3_BUCKET_NAME=BUCKET,
        S3_FORCE_PATH_STYLE="true",
        AWS_ACCESS_KEY_ID=access_key,
        AWS_SECRET_ACCESS_KEY=secret_key,
        LOG_LEVEL="warning",
    )
    return env


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


@dataclass
class Server:
    """`pacs-masks serve` running as a subprocess."""

    process: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT
    log: Path  # its stdout and stderr

    async def ready(self) -> None:
        await wait_ready(self.url, self.process, self.log)


@contextlib.contextmanager
def serving(env: dict[str, str], cwd: str | Path, *options: str) -> Iterator[Server]:
    """`pacs-masks serve [options]` on a free loopback port, stopped at the end. It is started
    here, not awaited: `await server.ready()` before the first request."""
    port = free_port()
    log = Path(cwd) / f"serve-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [CLI, "serve", "--port", str(port), *options],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Server(process, f"http://127.0.0.1:{port}", log)
    finally:
        stop(process)


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


@contextlib.contextmanager
def database(existing: str | None = None) -> Iterator[str]:
    """A fresh database, dropped at the end; or `existing` (an empty one), left as it is."""
    if existing is not None:
        yield existing
        return
    name = f"pacs_masks_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def moto_settings(moto_url: str) -> Settings:
    return s3_settings(moto_url, MOTO_KEY, MOTO_KEY, BUCKET)


async def ensure_bucket(settings: Settings) -> None:
    storage = await open_storage(settings)
    try:
        await storage.ensure_bucket([])
    finally:
        await storage.aclose()


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server in this process; its URL."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(20)
    if starter.is_alive():
        raise RuntimeError("moto server did not start")
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def host_context(database_url: str) -> dict[str, Any]:
    """The machine, Python, CPU and PostgreSQL the figures were taken on."""
    return {
        "machine": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "postgresql": asyncio.run(postgres_version(database_url)),
    }


def print_context(context: dict[str, Any], width: int = 12) -> None:
    for name, value in context.items():
        print(f"{name + ':':<{width}}{value}")


def mask(index: int, count: int, size: int = 512) -> np.ndarray:
    """An organ-like blob whose radius follows the slice: small, compressible, realistic."""
    y, x = np.ogrid[:size, :size]
    radius = 40 + 120 * np.sin(np.pi * (index + 0.5) / count)
    blob = (x - size // 2 - 30) ** 2 + (y - size // 2) ** 2 <= radius**2
    lesion = (x - size // 2 + 60) ** 2 + (y - size // 2 + 20) ** 2 <= (radius / 5) ** 2
    return (blob.astype(np.uint8) + lesion.astype(np.uint8)).astype(np.uint8)


def mask_pngs(folder: Path, count: int) -> Path:
    """`count` slices of `mask` as PNG files in `folder`, as a worker's output."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(mask(index, count)).save(folder / f"slice_{index:05d}.png")
    return folder


@dataclass
class Stack:
    database_url: str  # postgresql:// (asyncpg and node-postgres read it)
    s3_endpoint: str
    env: dict[str, str]  # the server's environment
    workdir: Path
    uploader: str = ""  # tokens
    reader: str = ""
    seaweed_version: str = ""

    def token(self, role: str) -> str:
        return create_token(self.env, self.workdir, "bench-" + role, role)


def weed_version() -> str:
    weed = Path(sys.executable).with_name("weed")
    binary = str(weed) if weed.exists() else shutil.which("weed")
    if binary is None:
        return "not installed"
    done = subprocess.run([binary, "version"], capture_output=True, text=True, check=False)
    match = re.search(r"version \S+ (\S+)", done.stdout)
    return match.group(1) if match else "unknown"


@contextlib.contextmanager
def stack(existing_database: str | None = None, *, moto: bool = False) -> Iterator[Stack]:
    """Database (a fresh one unless given) and S3 storage with the bench's bucket (SeaweedFS,
    or with `moto` moto's server in this process), migrated, with an UPLOADER and a READER
    token. The server's working directory is empty, so no .env file is read there."""
    with (
        tempfile.TemporaryDirectory(prefix="pacs-masks-bench-") as work,
        database(existing_database) as database_url,
        contextlib.ExitStack() as running,
    ):
        if moto:
            endpoint, keys, version = running.enter_context(moto_s3()), (MOTO_KEY, MOTO_KEY), ""
        else:
            seaweed = running.enter_context(running_seaweed(Path(work) / "seaweedfs"))
            endpoint, keys = seaweed.endpoint_url, (seaweed.access_key, seaweed.secret_key)
            version = weed_version()
        asyncio.run(ensure_bucket(s3_settings(endpoint, *keys, BUCKET)))
        env = server_env(database_url, endpoint, *keys)
        workdir = Path(work) / "server"
        workdir.mkdir()
        built = Stack(database_url, endpoint, env, workdir, seaweed_version=version)
        run_cli(env, workdir, "migrate")
        built.uploader = built.token("uploader")
        built.reader = built.token("reader")
        yield built


def serve_has_workers() -> bool:
    done = subprocess.run([CLI, "serve", "--help"], capture_output=True, text=True, check=False)
    return "--workers" in done.stdout


def add_workers_argument(parser: Any) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="serve --workers N (default: every core if serve has the flag)",
    )


def workers_or_default(workers: int | None) -> int | None:
    """`workers` if given; else every core when `serve --workers` exists, else None (the flag
    is not passed)."""
    if workers is not None:
        return workers
    return os.cpu_count() if serve_has_workers() else None


@contextlib.asynccontextmanager
async def served(built: Stack, workers: int | None) -> AsyncIterator[str]:
    """`pacs-masks serve` on a free loopback port, ready; yields its base URL."""
    options = ["--workers", str(workers)] if workers is not None else []
    # Started once, before any load: the blocking start does not disturb a measurement.
    with serving(built.env, built.workdir, *options) as server:
        await server.ready()
        yield server.url


@dataclass
class Tree:
    """A seeded annotation: its GraphQL id and its database id (what the peers take)."""

    gid: str
    db_id: int
    groups: int
    masks: int


async def seed_trees(
    base_url: str, built: Stack, count: int, groups: int, masks: int, study: str
) -> list[Tree]:
    """`count` annotations of `groups` COMPLETE groups of `masks` slices. One group is
    uploaded through the API and SeaweedFS as a worker uploads it; the others are copies of its
    rows made in SQL (the tree query reads rows, never storage), which keeps seeding to seconds
    where uploading 10,000 slices takes minutes on this machine."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as http:
        client = Client(http, built.uploader)
        first = await client.annotation(f"{study}.1")
        await client.upload(await client.group(first, masks), masks)
    connection = await asyncpg.connect(built.database_url)
    try:
        async with connection.transaction():
            source = await connection.fetchrow(
                "SELECT a.id AS annotation, g.id AS grp FROM annotation_annotation a"
                " JOIN annotation_mask_group g ON g.annotation_id = a.id"
                " WHERE a.study_instance_uid = $1",
                f"{study}.1",
            )
            trees = [Tree(first, source["annotation"], groups, masks)]
            for number in range(1, count):
                annotation = await clone_row(
                    connection,
                    "annotation_annotation",
                    source["annotation"],
                    {"study_instance_uid": f"{study}.{number + 1}"},
                )
                trees.append(Tree(str(annotation), annotation, groups, masks))
            for tree in trees:
                for _ in range(groups if tree.db_id != source["annotation"] else groups - 1):
                    group = await clone_row(
                        connection,
                        "annotation_mask_group",
                        source["grp"],
                        {"annotation_id": tree.db_id},
                    )
                    await clone_children(
                        connection, "annotation_mask", "mask_group_id", source["grp"], group
                    )
    finally:
        await connection.close()
    return trees


async def background_settled(built: Stack, timeout: float = 180) -> None:
    """Waits until the server's validation job has reported on every COMPLETE group (it runs
    every 30 s and validates a group once): a burst of freshly seeded groups must not be
    validated while the figures are taken. Says how long it waited."""
    started = time.monotonic()
    connection = await asyncpg.connect(built.database_url)
    try:
        while time.monotonic() - started < timeout:
            waiting = await connection.fetchval(
                "SELECT count(*) FROM annotation_mask_group g"
                " WHERE g.status = 'COMPLETE' AND g.deleted_at IS NULL AND NOT EXISTS"
                " (SELECT 1 FROM mask_group_validation v WHERE v.mask_group_id = g.id)"
            )
            if waiting == 0:
                break
            await asyncio.sleep(1)
    finally:
        await connection.close()
    waited = time.monotonic() - started
    print(f"the validation job reported on every group after {waited:.0f} s", flush=True)


async def _columns(connection: asyncpg.Connection, table: str) -> list[str]:
    # Read from the catalogue so a column added by a later migration is copied too.
    rows = await connection.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = $1 AND column_name <> 'id'"
        " ORDER BY ordinal_position",
        table,
    )
    return [row["column_name"] for row in rows]


async def clone_row(
    connection: asyncpg.Connection, table: str, row_id: int, changes: dict[str, Any]
) -> int:
    columns = await _columns(connection, table)
    arguments = [changes[column] for column in columns if column in changes]
    # Placeholders are numbered by position among the changed columns.
    numbered = iter(range(2, 2 + len(arguments)))
    values = [f"${next(numbered)}" if column in changes else f'"{column}"' for column in columns]
    names = ", ".join(f'"{column}"' for column in columns)
    sql = f'INSERT INTO "{table}" ({names}) SELECT {", ".join(values)} FROM "{table}" WHERE id = $1 RETURNING id'
    new_id: int = await connection.fetchval(sql, row_id, *arguments)
    return new_id


async def clone_children(
    connection: asyncpg.Connection, table: str, parent: str, old: int, new: int
) -> None:
    columns = await _columns(connection, table)
    names = ", ".join(f'"{column}"' for column in columns)
    values = ", ".join("$2" if column == parent else f'"{column}"' for column in columns)
    await connection.execute(
        f'INSERT INTO "{table}" ({names}) SELECT {values} FROM "{table}" WHERE "{parent}" = $1',
        old,
        new,
    )


def tree_body(tree: Tree, query: str = TREE) -> str:
    return json.dumps({"query": query, "variables": {"id": tree.gid}})


async def count_masks(url: str, body: str, headers: dict[str, str], path: list[str]) -> int:
    """One request outside the timed runs: the answer is the whole tree, not an error."""
    async with httpx.AsyncClient(timeout=120) as http:
        response = await http.post(
            url, content=body, headers={**headers, "Content-Type": "application/json"}
        )
    answer = response.json()
    if response.status_code != 200 or answer.get("errors"):
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
    node = answer["data"]
    for key in path[:-2]:
        node = node[key]
    return sum(len(group[path[-1]]) for group in node[path[-2]])


# wrk's Lua: every request is a POST of the next body (round robin over the trees); an answer
# that is not 200 or carries GraphQL errors counts as an error; done() prints one JSON line.
WRK_SCRIPT = """
local bodies = {BODIES}
local headers = {HEADERS}
local path = "{PATH}"
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  bad = 0
  counter = math.random(#bodies)
end
function request()
  counter = counter + 1
  return wrk.format("POST", path, headers, bodies[(counter % #bodies) + 1])
end
function response(status, headers, body)
  if status ~= 200 or string.find(body, '"errors"', 1, true) then
    bad = bad + 1
  end
end
function done(summary, latency, requests)
  local answered_bad = 0
  for _, thread in ipairs(threads) do
    answered_bad = answered_bad + thread:get("bad")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "seconds": %.3f, "bad_answers": %d, "socket_errors": %d, '
    .. '"timeouts": %d, "p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, '
    .. '"mean_ms": %.3f}\\n',
    summary.requests, summary.duration / 1e6, answered_bad,
    e.connect + e.read + e.write, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000))
end
"""


@dataclass
class LoadResult:
    requests: int
    seconds: float
    bad_answers: int
    socket_errors: int
    timeouts: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def errors(self) -> int:
        return self.bad_answers + self.socket_errors + self.timeouts

    def line(self) -> str:
        return (
            f"{self.requests} requests in {self.seconds:.1f} s ({self.per_second:.1f}/s), "
            f"p50 {self.p50_ms:.1f} ms, p95 {self.p95_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
            f"max {self.max_ms:.1f} ms, errors {self.errors}"
        )


def wrk_binary() -> str:
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (the load generator)")
    return binary


def lua_string(text: str) -> str:
    level = "=" * 4
    if f"]{level}]" in text:
        raise ValueError("body closes the Lua long bracket")
    return f"[{level}[{text}]{level}]"


def wrk_version() -> str:
    done = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"wrk (\S+)", done.stdout + done.stderr)
    return match.group(1) if match else "unknown"


async def run_wrk(
    url: str,
    bodies: list[str],
    headers: dict[str, str],
    *,
    connections: int,
    seconds: float,
    threads: int = 2,
) -> LoadResult:
    """Closed loop: each of `connections` connections sends its next request when the last
    answer arrived (a viewer waiting for its tree)."""
    base, _, path = url.partition("/graphql")
    all_headers = {"Content-Type": "application/json", **headers}
    script = (
        WRK_SCRIPT.replace("{BODIES}", "{" + ", ".join(lua_string(body) for body in bodies) + "}")
        .replace(
            "{HEADERS}",
            "{"
            + ", ".join(f"[ {lua_string(k)} ] = {lua_string(v)}" for k, v in all_headers.items())
            + "}",
        )
        .replace("{PATH}", "/graphql" + path)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    try:
        command = [
            wrk_binary(),
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--timeout",
            "30s",
            "-s",
            file.name,
            base,
        ]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
    finally:
        Path(file.name).unlink()
    text = output.decode(errors="replace")
    match = re.search(r"^WRK_RESULT (.*)$", text, re.MULTILINE)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {text[-2000:]}")
    # wrk leaves up to `connections` requests in flight that the server still works off; one
    # more request waits behind them, so the next measurement starts on an idle server.
    async with httpx.AsyncClient(timeout=300) as http:
        await http.post(url, content=bodies[0], headers=all_headers)
    result = LoadResult(**json.loads(match.group(1)))
    if result.requests == 0:
        # No answer within the run: every viewer waited at least that long (wrk reports 0).
        waited = seconds * 1000
        result.p50_ms = result.p95_ms = result.p99_ms = result.max_ms = result.mean_ms = waited
    return result
