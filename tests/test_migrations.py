"""Alembic owns the schema: the migrations build exactly what the models describe."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from app.db import Base, alembic_config, create_engine, upgrade_database
from app.models import Annotation, Mask, MaskGroup, MaskGroupStatus, utcnow


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    with warnings.catch_warnings():
        # SQLite cannot reflect expression indexes; PostgreSQL compares them.
        warnings.filterwarnings("ignore", "autogenerate skipping metadata-specified expression")
        warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based")
        return compare_metadata(context, Base.metadata)


async def test_models_match_migrations(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            differences = await connection.run_sync(_differences)
    finally:
        await engine.dispose()
    assert differences == []


async def test_downgrade_and_upgrade_again(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'roundtrip.db'}"
    await asyncio.to_thread(upgrade_database, url)
    await asyncio.to_thread(command.downgrade, alembic_config(url), "base")
    await asyncio.to_thread(upgrade_database, url)


async def test_slice_triple_is_unique_even_without_label(database_url: str) -> None:
    engine = create_engine(database_url)
    now = utcnow()
    try:
        async with engine.begin() as connection:
            annotation_id = await connection.scalar(
                insert(Annotation)
                .values(study_instance_uid="1.2", created_at=now)
                .returning(Annotation.id)
            )
            group_id = await connection.scalar(
                insert(MaskGroup)
                .values(
                    annotation_id=annotation_id,
                    slice_count=1,
                    mask_type="segmentation",
                    status=MaskGroupStatus.PENDING,
                    uploaded_slice_count=0,
                    total_bytes=0,
                    created_at=now,
                )
                .returning(MaskGroup.id)
            )
        row = {
            "mask_group_id": group_id,
            "slice_index": 0,
            "label_name": None,
            "file_path": "mask/x",
            "file_size": 1,
            "checksum": "md5:" + "0" * 32,
            "mime_type": "image/png",
            "created_at": now,
        }
        async with engine.begin() as connection:
            await connection.execute(insert(Mask), [row, {**row, "label_name": "liver"}])
        with pytest.raises(IntegrityError):
            async with engine.begin() as connection:
                await connection.execute(insert(Mask), [row])
        async with engine.begin() as connection:
            await connection.execute(delete(Annotation).where(Annotation.id == annotation_id))
            remaining = await connection.scalar(select(func.count()).select_from(Mask))
        assert remaining == 0  # ON DELETE CASCADE reaches the masks
    finally:
        await engine.dispose()
