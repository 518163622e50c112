"""What the server does at start-up for its first large batches: a warm-up that asks neither
the database nor storage for anything, and the garbage collector's tuning (app.gc_tuning),
undone at shutdown."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
from conftest import Stack, base_settings, count_statements, serve

from app.gc_tuning import THRESHOLDS
from app.graphql.schema import create_schema
from app.warmup import warm_up


async def test_the_warm_up_runs_no_query_and_stores_nothing(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    services = stack.services
    with count_statements(services.engine) as statements, caplog.at_level(logging.WARNING):
        await warm_up(
            create_schema(),
            services.settings,
            services.sessionmaker,
            services.storage,
            services.jobs,
            services.events,
        )
    assert statements == []
    # It was refused where it should be (the role check), not somewhere unexpected.
    assert [record for record in caplog.records if record.name == "app.warmup"] == []
    assert [page async for page in stack.storage.list_objects("mask/")] == []


@pytest.mark.parametrize("tuning", [True, False], ids=["tuned", "stock"])
async def test_gc_is_tuned_while_the_app_runs_and_restored_after(
    own_sqlite_url: str, tmp_path: Path, tuning: bool
) -> None:
    settings = base_settings(
        database_url=own_sqlite_url,
        var_dir=tmp_path,
        storage_provider="local",
        gc_tuning=tuning,
    )
    before = gc.get_threshold()
    async with serve(settings):
        if tuning:
            assert gc.get_threshold() == THRESHOLDS
            # Start-up's objects: modules, the schema, SQLAlchemy's and botocore's metadata.
            assert gc.get_freeze_count() > 100_000
        else:
            assert gc.get_threshold() == before
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
