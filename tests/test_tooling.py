"""The code style gates run with the test command: ruff format, ruff check, mypy --strict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "format", "--check", "app", "tests", "migrations", "bench"],
        ["ruff", "check", "app", "tests", "migrations", "bench"],
        ["mypy", "--strict", "app"],
    ],
    ids=["ruff-format", "ruff-check", "mypy-strict"],
)
def test_tool_passes(command: list[str]) -> None:
    executable = BIN / command[0]
    result = subprocess.run(
        [str(executable), *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
