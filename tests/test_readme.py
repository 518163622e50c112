"""The README's examples run as written, and it documents every setting and the CI command."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

from conftest import base_settings, open_stack, unavailable

from app.config import Settings
from app.db import upgrade_database

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def upload_sequence_script() -> str:
    """The shell blocks of "The upload sequence", in order, as one bash script."""
    start = README.index("## The upload sequence")
    section = README[start : README.index("\n## ", start)]
    return "\n".join(re.findall(r"```sh\n(.*?)```", section, re.DOTALL))


def _with_server(script: str, base_url: str, token: str) -> str:
    # The two values the README asks the reader to set; everything else runs as written.
    script, pacs = re.subn(r"(?m)^PACS=\S+$", f"PACS={base_url}", script)
    script, tokens = re.subn(r"(?m)^TOKEN=\S+(.*)$", f"TOKEN={token}", script)
    assert (pacs, tokens) == (1, 1), "the README no longer sets PACS and TOKEN once"
    return "set -euo pipefail\n" + script


async def test_upload_sequence_commands_run(tmp_path: Path) -> None:
    for tool in ("bash", "curl", "jq", "openssl"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (.ci/run installs jq)")
    settings = base_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'readme.db'}", var_dir=tmp_path
    )
    await asyncio.to_thread(upgrade_database, settings.resolved_database_url)
    async with open_stack("readme", settings) as stack:
        script = _with_server(upload_sequence_script(), stack.base_url, stack.tokens["uploader"])
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            script,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
        output = stdout.decode()
        assert process.returncode == 0, output + stderr.decode()
        keys = {item.key async for page in stack.storage.list_objects("mask/") for item in page}
    assert '"user": "uploader-1"' in output
    assert "annotation 1" in output
    assert "mask group 1" in output
    assert "mask/1/1/slice_00000.png\nmask/1/1/slice_00001_tumor.png" in output
    assert '"status": "COMPLETE"' in output
    assert '"deletedObjectCount": 2' in output
    assert (tmp_path / "viewed_0.png").read_bytes() == (tmp_path / "slice_0.png").read_bytes()
    assert keys == set()


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in README, f"{name.upper()} is not in the README's table"


def test_ci_runs_the_readme_test_command() -> None:
    command = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest"
    assert command in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()
