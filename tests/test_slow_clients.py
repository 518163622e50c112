"""A real `pacs-masks serve` process against slow clients (raw sockets that trickle headers or a
body: 408 or a closed connection within the configured bound) and its access log (no storage
signature, no token)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import content_md5, png_bytes
from operations import CREATE_ANNOTATION, CREATE_GROUP, REQUEST_URLS

from app.log_redaction import redact

BIN = Path(sys.executable).parent
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
# What a loaded two-core machine may add to a deadline before the server acts on it.
MARGIN = 2.0
BODIES = [png_bytes(0), png_bytes(1)]


@dataclass
class Served:
    port: int
    token: str
    log: Path
    storage: Path
    # Signed PUT targets of a group of two slices: (url, headers).
    uploads: list[tuple[str, dict[str, str]]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gql(base: str, token: str, query: str, variables: dict[str, object]) -> dict[str, object]:
    response = httpx.post(
        f"{base}/graphql",
        json={"query": query, "variables": variables},
        headers={"Authorization": f"Bearer {token}"},
    )
    body = response.json()
    assert "errors" not in body, body
    data: dict[str, object] = body["data"]
    return data


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    cwd = tmp_path_factory.mktemp("served")
    port = _free_port()
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    env |= {
        "REQUEST_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "REQUEST_BODY_TIMEOUT": str(BODY_TIMEOUT),
    }
    log = cwd / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "pacs-masks"), "serve", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start within 30 s"
            time.sleep(0.1)
        token = log.read_text().split("it is shown only once:\n", 1)[1].split()[0]
        created = _gql(base, token, CREATE_ANNOTATION, {"input": {"studyInstanceUid": "1.2.3"}})
        annotation_id = created["createAnnotation"]["id"]  # type: ignore[index]
        group = _gql(
            base, token, CREATE_GROUP, {"input": {"annotationId": annotation_id, "sliceCount": 2}}
        )
        group_id = group["createMaskGroup"]["id"]  # type: ignore[index]
        slices = [
            {"sliceIndex": index, "fileSize": len(body), "contentMd5": content_md5(body)}
            for index, body in enumerate(BODIES)
        ]
        targets = _gql(base, token, REQUEST_URLS, {"groupId": group_id, "slices": slices})
        uploads = [
            (target["url"], {item["name"]: item["value"] for item in target["headers"]})
            for target in targets["requestMaskUploadUrls"]  # type: ignore[attr-defined]
        ]
        yield Served(port, token, log, cwd / "var" / "storage", uploads)
    finally:
        process.terminate()
        process.wait(timeout=15)


def _trickle(port: int, head: bytes, piece: bytes, bound: float) -> tuple[bytes, float]:
    """Sends `head`, then `piece` every 0.2 s until the server answers or closes (or twice the
    bound passes); returns what it answered and when."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.2)
        started = time.monotonic()
        sock.sendall(head)
        answer = b""
        while time.monotonic() - started < 2 * (bound + MARGIN):
            try:
                sock.sendall(piece)
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset or broken pipe: the server closed on us
                break
            if not data:
                break
            answer += data
            if b"\r\n\r\n" in answer:
                break
        return answer, time.monotonic() - started


def _refused_in_time(answer: bytes, seconds: float, bound: float) -> None:
    assert seconds < bound + MARGIN, seconds
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer


def test_headers_sent_slowly_are_cut_off(served: Served) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    answer, seconds = _trickle(served.port, head, b"X-Slow: 1\r\n", HEADER_TIMEOUT)
    _refused_in_time(answer, seconds, HEADER_TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 408")


def test_a_silent_connection_is_cut_off(served: Served) -> None:
    answer, seconds = _trickle(served.port, b"", b"", HEADER_TIMEOUT)
    _refused_in_time(answer, seconds, HEADER_TIMEOUT)


def test_a_graphql_body_sent_slowly_is_cut_off(served: Served) -> None:
    head = (
        b"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n{"
    )
    answer, seconds = _trickle(served.port, head, b" ", BODY_TIMEOUT)
    _refused_in_time(answer, seconds, BODY_TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 408")


def test_a_storage_put_sent_slowly_is_cut_off_and_stores_nothing(served: Served) -> None:
    url, headers = served.uploads[1]
    target = urlsplit(url)
    lines = [f"PUT {target.path}?{target.query} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(BODIES[1])}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    answer, seconds = _trickle(served.port, head, b"x", BODY_TIMEOUT)
    _refused_in_time(answer, seconds, BODY_TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 408")
    # Nothing was stored, not even a partial file; the client may simply try again.
    assert [path.name for path in served.storage.rglob("*slice_00001*")] == []
    again = httpx.put(url, content=BODIES[1], headers=headers)
    assert again.status_code == 200


def test_the_access_log_holds_no_signature_and_no_token(served: Served) -> None:
    url, headers = served.uploads[0]
    assert httpx.put(url, content=BODIES[0], headers=headers).status_code == 200
    query = urlsplit(url).query
    time.sleep(0.2)  # the access line is written after the answer
    log = served.log.read_text()
    # The request log writes the path only, never the query string.
    [line] = [line for line in log.splitlines() if "PUT /storage/mask/1/1/slice_00000" in line]
    assert "/slice_00000.png?" not in line
    assert query not in log
    assert "signature=" not in log
    # Only the first-start banner shows the token, never a log line.
    assert log.count(served.token) == 1


def test_signed_parameters_are_redacted_anywhere() -> None:
    presigned = (
        "GET /bucket/mask/1/1/slice_00000.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIA%2F20261125&X-Amz-Signature=0a1b2c&X-Amz-Expires=600"
    )
    redacted = redact(presigned)
    assert "0a1b2c" not in redacted
    assert "AKIA" not in redacted
    assert "X-Amz-Expires=600" in redacted
    assert redact("token pmk_abcDEF-123_x here") == "token pmk_[redacted] here"


def test_oversized_headers_are_refused(served: Served) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        try:
            sock.sendall(head)
        except OSError:  # closed while we were still sending: refused as well
            return
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer
