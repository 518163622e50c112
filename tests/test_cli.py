"""The command line: the embedded default starts with no setup; migrate; export-schema."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    # The embedded default: no DATABASE_URL, no storage settings.
    return {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}


def _start(tmp_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(BIN / "pacs-masks"), "serve", "--port", str(port)],
            cwd=tmp_path,
            env=_clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_healthy(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            return
        except httpx.TransportError:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start within 30 s"
            time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=15)


CREATE = 'mutation { createAnnotation(input: {studyInstanceUid: "1.2.3"}) { id createdBy } }'


def test_serve_on_the_embedded_default(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
    process = _start(tmp_path, port, log)
    try:
        _wait_healthy(process, port, log)
        url = f"http://127.0.0.1:{port}/graphql"
        output = log.read_text()
        token = output.split("it is shown only once:\n", 1)[1].split()[0]
        refused = httpx.post(url, json={"query": CREATE})
        assert refused.status_code == 401
        created = httpx.post(
            url, json={"query": CREATE}, headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert created == {"data": {"createAnnotation": {"id": "1", "createdBy": "admin"}}}
    finally:
        _stop(process)
    assert f"{url}" in output
    assert (tmp_path / "var" / "pacs-masks.db").exists()
    assert (tmp_path / "var" / "storage").is_dir()

    # The next start reuses the database and prints no new token.
    process = _start(tmp_path, port, log)
    try:
        _wait_healthy(process, port, log)
    finally:
        _stop(process)
    assert log.read_text().count("shown only once") == 1


def test_serve_refuses_a_public_address_without_authentication(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "pacs-masks"), "serve", "--host", "0.0.0.0", "--port", str(_free_port())],
        cwd=tmp_path,
        env={**_clean_env(), "AUTH_DISABLED": "true"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr


def test_migrate_and_export_schema(tmp_path: Path) -> None:
    env = {**_clean_env(), "DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"}
    migrated = subprocess.run(
        [str(BIN / "pacs-masks"), "migrate"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert (tmp_path / "m.db").exists()
    exported = subprocess.run(
        [str(BIN / "pacs-masks"), "export-schema"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "requestMaskUploadUrls" in exported.stdout
