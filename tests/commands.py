"""Running the `pacs-masks` command line as a user does: a separate process, a clean
environment plus what the test sets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
