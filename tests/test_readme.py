"""The README's examples run as written, and it documents every setting and the CI command."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import httpx
from conftest import Stack, base_settings, open_stack

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _examples() -> list[tuple[str, dict[str, Any]]]:
    pattern = re.compile(r"```graphql\n(.*?)```\n```json\n(.*?)```", re.DOTALL)
    return [(query, json.loads(variables)) for query, variables in pattern.findall(README)]


async def test_upload_sequence_examples_run(tmp_path: Path) -> None:
    png = base64.b64decode(re.search(r"echo '([A-Za-z0-9+/=]+)' \| base64 -d", README).group(1))  # type: ignore[union-attr]
    examples = _examples()
    assert len(examples) == 6
    settings = base_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'readme.db'}", var_dir=tmp_path
    )
    import asyncio

    from app.db import upgrade_database

    await asyncio.to_thread(upgrade_database, settings.resolved_database_url)
    async with open_stack("readme", settings) as stack:
        results = [await _run(stack, query, variables, png) for query, variables in examples]
    targets = results[2]["requestMaskUploadUrls"]
    assert [t["filePath"] for t in targets] == [
        "mask/1/1/slice_00000.png",
        "mask/1/1/slice_00001_tumor.png",
    ]
    assert results[3]["completeMaskUpload"]["maskGroup"]["status"] == "COMPLETE"
    tree = results[4]["annotation"]["maskGroups"][0]["masks"]
    assert tree[0]["viewUrl"].startswith("/api/mask-group/1/view?slice=0&expires=")
    assert results[5]["deleteMaskGroup"]["deletedObjectCount"] == 2


async def _run(stack: Stack, query: str, variables: dict[str, Any], png: bytes) -> dict[str, Any]:
    data = await stack.data(query, variables)
    for target in data.get("requestMaskUploadUrls", []):
        # Step 4, as the curl line does it.
        headers = {header["name"]: header["value"] for header in target["headers"]}
        async with httpx.AsyncClient() as client:
            response = await client.put(target["url"], content=png, headers=headers)
        assert response.status_code == 200, response.text
    return data


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in README, f"{name.upper()} is not in the README's table"


def test_ci_runs_the_readme_test_command() -> None:
    command = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest"
    assert command in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()
