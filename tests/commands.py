"""Running the `pacs-masks` command line as a user does: a separate process, a clean
environment plus what the test sets."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def clean_env(**settings: str) -> dict[str, str]:
    # The embedded default unless the test says otherwise: no DATABASE_URL, no storage settings.
    base = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    return {**base, **settings}


def run_cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pacs-masks"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass
class ServedProcess:
    base_url: str
    # The ADMIN token `serve` prints on the embedded default's first start, else None.
    token: str | None
    stdout: Path
    stderr: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served(cwd: Path, env: dict[str, str]) -> Iterator[ServedProcess]:
    """`pacs-masks serve` on a free port (embedded default under cwd unless env says
    otherwise), until the block ends; its stdout and stderr are kept in files under cwd."""
    port = _free_port()
    stdout, stderr = cwd / "serve.out", cwd / "serve.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [str(BIN / "pacs-masks"), "serve", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=err,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "server did not start within 30 s"
            time.sleep(0.1)
        printed = stdout.read_text()
        first_start = "it is shown only once:\n" in printed
        token = printed.split("it is shown only once:\n", 1)[1].split()[0] if first_start else None
        yield ServedProcess(base_url, token, stdout, stderr)
    finally:
        process.terminate()
        process.wait(timeout=15)
