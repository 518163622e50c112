"""The stack the load and peer benchmarks share: a fresh PostgreSQL database, SeaweedFS's S3
API (started as the tests start it), `pacs-masks serve` as a subprocess (with `--workers`),
trees seeded through the API as workers upload them, and wrk as the load generator in its own
process (a C program: it does not take the CPU the server is measured with, as a Python client
on this 2-core machine would).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from run import (
    ADMIN_URL,
    BIN,
    TREE,
    Client,
    admin_execute,
    free_port,
    run_cli,
    server_env,
    stop,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from storage_servers import running_seaweed, s3_settings

from app.main import open_storage

BUCKET = "pacs-masks-bench"
CLI = str(BIN / "pacs-masks")


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
        output = run_cli(
            CLI,
            self.env,
            str(self.workdir),
            "create-token",
            "--user",
            "bench-" + role,
            "--role",
            role,
        )
        return output.strip().splitlines()[-1]


@contextlib.contextmanager
def database() -> Iterator[str]:
    name = f"pacs_masks_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def weed_version() -> str:
    weed = Path(sys.executable).with_name("weed")
    binary = str(weed) if weed.exists() else shutil.which("weed")
    if binary is None:
        return "not installed"
    done = subprocess.run([binary, "version"], capture_output=True, text=True, check=False)
    match = re.search(r"version \S+ (\S+)", done.stdout)
    return match.group(1) if match else "unknown"


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    """Database and SeaweedFS, migrated, with an UPLOADER and a READER token."""
    with (
        tempfile.TemporaryDirectory(prefix="pacs-masks-bench-") as work,
        database() as database_url,
        running_seaweed(Path(work) / "seaweedfs") as seaweed,
    ):
        env = server_env(database_url, seaweed.endpoint_url)
        env.update(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key)
        settings = s3_settings(seaweed.endpoint_url, seaweed.access_key, seaweed.secret_key, BUCKET)
        asyncio.run(_ensure_bucket(settings))
        workdir = Path(work) / "server"
        workdir.mkdir()
        built = Stack(
            database_url, seaweed.endpoint_url, env, workdir, seaweed_version=weed_version()
        )
        run_cli(CLI, env, str(workdir), "migrate")
        built.uploader = built.token("uploader")
        built.reader = built.token("reader")
        yield built


async def _ensure_bucket(settings: Any) -> None:
    storage = await open_storage(settings)
    try:
        await storage.ensure_bucket([])
    finally:
        await storage.aclose()


def serve_has_workers() -> bool:
    done = subprocess.run([CLI, "serve", "--help"], capture_output=True, text=True, check=False)
    return "--workers" in done.stdout


def default_workers() -> int | None:
    """Every core when `serve --workers` exists, else None (the flag is not passed)."""
    return os.cpu_count() if serve_has_workers() else None


@contextlib.asynccontextmanager
async def served(built: Stack, workers: int | None) -> AsyncIterator[str]:
    """`pacs-masks serve` on a free loopback port; yields its base URL."""
    port = free_port()
    command = [CLI, "serve", "--port", str(port)]
    if workers is not None:
        command += ["--workers", str(workers)]
    log = built.workdir / f"serve-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: ASYNC220 (started once, before any load)
            command,
            env=built.env,
            cwd=built.workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_ready(f"http://127.0.0.1:{port}", process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


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


async def background_settled(built: Stack, timeout: float = 180) -> float:
    """Waits until the server's validation job has reported on every COMPLETE group (it runs
    every 30 s and validates a group once): a burst of freshly seeded groups must not be
    validated while the figures are taken. Returns the seconds waited."""
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
    return time.monotonic() - started


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


def tree_body(tree: Tree) -> str:
    return json.dumps({"query": TREE, "variables": {"id": tree.gid}})


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
