"""Storage usage after real uploads: by model, annotation, modality and day, from the database in
one query; ADMIN only; `pacs-masks usage` prints the same figures."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy
from alembic import command
from commands import clean_env, run_cli
from conftest import Stack, count_statements, png_bytes
from flows import create_annotation, create_group, upload
from sqlalchemy import text

from app.db import alembic_config, create_engine, create_sessionmaker, upgrade_database
from app.usage import UsageGrouping, UsageRow, storage_usage

USAGE = """
query($by: StorageUsageGrouping!) {
  storageUsage(groupBy: $by) { key maskGroupCount objectCount totalBytes }
}"""

SIZE = len(png_bytes(0))


async def _uploads(stack: Stack) -> tuple[str, str]:
    first = await create_annotation(stack, "1.2.826.0.1.1")
    second = await create_annotation(stack, "1.2.826.0.1.2")
    liver = await create_group(stack, first, 3, modelName="liver-seg", modality="CT")
    await upload(stack, liver, range(3))
    await upload(stack, liver, [0, 1], label="tumor")
    again = await create_group(stack, second, 2, modelName="liver-seg", modality="CT")
    await upload(stack, again, [0])
    brain = await create_group(stack, second, 4, modelName="brain-seg", modality="MR")
    await upload(stack, brain, range(4))
    # A group without model or modality, nothing uploaded yet: counted, with no bytes.
    await create_group(stack, second, 1)
    return first, second


def _figures(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    return {
        row["key"]: (row["maskGroupCount"], row["objectCount"], row["totalBytes"]) for row in rows
    }


async def test_usage_by_model_annotation_modality_and_day(stack: Stack, tmp_path: Path) -> None:
    first, second = await _uploads(stack)

    with count_statements(stack.engine) as statements:
        async with stack.sessionmaker() as session:
            await storage_usage(session, UsageGrouping.MODEL)
    assert len(statements) == 1

    by_model = (await stack.data(USAGE, {"by": "MODEL"}, as_="admin"))["storageUsage"]
    # Largest first.
    assert by_model == [
        {"key": "liver-seg", "maskGroupCount": 2, "objectCount": 6, "totalBytes": 6 * SIZE},
        {"key": "brain-seg", "maskGroupCount": 1, "objectCount": 4, "totalBytes": 4 * SIZE},
        {"key": "", "maskGroupCount": 1, "objectCount": 0, "totalBytes": 0},
    ]
    by_modality = (await stack.data(USAGE, {"by": "MODALITY"}, as_="admin"))["storageUsage"]
    assert _figures(by_modality) == {
        "CT": (2, 6, 6 * SIZE),
        "MR": (1, 4, 4 * SIZE),
        "": (1, 0, 0),
    }
    by_annotation = (await stack.data(USAGE, {"by": "ANNOTATION"}, as_="admin"))["storageUsage"]
    assert _figures(by_annotation) == {first: (1, 5, 5 * SIZE), second: (3, 5, 5 * SIZE)}
    by_day = (await stack.data(USAGE, {"by": "DAY"}, as_="admin"))["storageUsage"]
    today = datetime.now(UTC).date().isoformat()
    assert _figures(by_day) == {today: (4, 10, 10 * SIZE)}
    default = (await stack.data("{ storageUsage { key } }", as_="admin"))["storageUsage"]
    assert [row["key"] for row in default] == ["liver-seg", "brain-seg", ""]

    env = clean_env(DATABASE_URL=stack.settings.resolved_database_url)
    result = await asyncio.to_thread(run_cli, tmp_path, env, "usage", "--group-by", "modality")
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["modality", "groups", "objects", "bytes"]
    assert lines[1] == ["CT", "2", "6", str(6 * SIZE)]
    assert lines[-1] == ["total", "4", "10", str(10 * SIZE)]
    result = await asyncio.to_thread(run_cli, tmp_path, env, "usage", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0] == {
        "key": "liver-seg",
        "mask_group_count": 2,
        "object_count": 6,
        "total_bytes": 6 * SIZE,
    }


async def test_usage_is_for_admins_only(stack: Stack) -> None:
    for role in ("reader", "uploader"):
        error = await stack.error(USAGE, {"by": "MODEL"}, as_=role)
        assert error["extensions"]["code"] == "FORBIDDEN"
    assert (await stack.data(USAGE, {"by": "DAY"}, as_="admin"))["storageUsage"] == []


async def test_usage_command_refuses_an_unknown_grouping(tmp_path: Path) -> None:
    result = await asyncio.to_thread(run_cli, tmp_path, clean_env(), "usage", "--group-by", "size")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert "Traceback" not in result.stderr


def _before_object_count(url: str) -> None:
    """A database at the revision before object_count, with one group of three masks."""
    command.upgrade(alembic_config(url), "3f9c2d7e8a41")
    engine = sqlalchemy.create_engine(url.replace("+aiosqlite", ""))
    now = "2026-11-01 10:00:00.000000"
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO annotation_annotation (id, study_instance_uid, created_at) "
                "VALUES (1, '1.2.3', :now)"
            ),
            {"now": now},
        )
        connection.execute(
            text(
                "INSERT INTO annotation_mask_group (id, annotation_id, slice_count, mask_type, "
                "created_at, status, uploaded_slice_count, total_bytes) "
                "VALUES (1, 1, 2, 'segmentation', :now, 'COMPLETE', 2, 30)"
            ),
            {"now": now},
        )
        for index, label in ((0, None), (1, None), (1, "tumor")):
            connection.execute(
                text(
                    "INSERT INTO annotation_mask (mask_group_id, slice_index, label_name, "
                    "file_path, mime_type, file_size, checksum, created_at) "
                    "VALUES (1, :index, :label, 'k', 'image/png', 10, 'md5:x', :now)"
                ),
                {"index": index, "label": label, "now": now},
            )
    engine.dispose()


async def test_the_migration_counts_the_objects_of_existing_groups(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'before.db'}"
    await asyncio.to_thread(_before_object_count, url)
    await asyncio.to_thread(upgrade_database, url)
    engine = create_engine(url)
    try:
        async with create_sessionmaker(engine)() as session:
            rows = await storage_usage(session, UsageGrouping.DAY)
    finally:
        await engine.dispose()
    assert rows == [UsageRow(key="2026-11-01", mask_group_count=1, object_count=3, total_bytes=30)]
