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


def test_serve_on_the_embedded_default(tmp_path: Path) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [str(BIN / "pacs-masks"), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "server did not start within 30 s"
                time.sleep(0.2)
        assert health.status_code == 200
        created = httpx.post(
            f"http://127.0.0.1:{port}/graphql",
            json={
                "query": 'mutation { createAnnotation(input: {studyInstanceUid: "1.2.3"}) { id } }'
            },
        ).json()
        assert created == {"data": {"createAnnotation": {"id": "1"}}}
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)
    assert f"http://127.0.0.1:{port}/graphql" in output
    assert (tmp_path / "var" / "pacs-masks.db").exists()
    assert (tmp_path / "var" / "storage").is_dir()


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
