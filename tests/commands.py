"""Running the `pacs-masks` command line as a user does: a separate process, a clean
environment plus what the test sets."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent


def clean_env(**settings: str) -> dict[str, str]:
    # The embedded default unless the test says otherwise: no DATABASE_URL, no storage settings.
    # PYTHONPATH: a checkout run with the package installed from another one tests its own code.
    kept = ("PATH", "HOME", "LANG", "PYTHONPATH")
    base = {key: os.environ[key] for key in kept if key in os.environ}
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
    # `serve --workers N`: the process ids of the N workers (the first ones started).
    worker_pids: set[int]
    process: subprocess.Popen[bytes]

    def log_lines(self) -> list[dict[str, Any]]:
        """What the server has logged so far (JSON lines: its stderr is no terminal)."""
        lines = self.stderr.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def _started_workers(stderr: Path) -> set[int]:
    return {
        int(line["pid"])
        for line in (
            json.loads(text) for text in stderr.read_text().splitlines() if text.startswith("{")
        )
        if line.get("message") == "Application startup complete."
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served(cwd: Path, env: dict[str, str], *, workers: int = 1) -> Iterator[ServedProcess]:
    """`pacs-masks serve` on a free port (embedded default under cwd unless env says
    otherwise), until the block ends; its stdout and stderr are kept in files under cwd.
    With `workers`, `serve --workers N`, ready when every worker has started."""
    port = _free_port()
    stdout, stderr = cwd / "serve.out", cwd / "serve.err"
    extra = ["--workers", str(workers)] if workers > 1 else []
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [str(BIN / "pacs-masks"), "serve", "--port", str(port), *extra],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=err,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        # Each worker imports the whole app: seconds each on a machine the tests share.
        deadline = time.monotonic() + 30 * workers
        while True:
            try:
                answered = httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
                if answered and (workers == 1 or len(_started_workers(stderr)) >= workers):
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "server did not start in time"
            time.sleep(0.1)
        printed = stdout.read_text()
        first_start = "it is shown only once:\n" in printed
        token = printed.split("it is shown only once:\n", 1)[1].split()[0] if first_start else None
        pids = _started_workers(stderr) if workers > 1 else {process.pid}
        yield ServedProcess(base_url, token, stdout, stderr, pids, process)
    finally:
        process.terminate()
        process.wait(timeout=15)
