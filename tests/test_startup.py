"""What the server does at start-up for its first large batches: a warm-up that asks neither
the database nor storage for anything, and start-up's objects frozen out of the garbage
collector's sight (app.gc_tuning), handed back at shutdown."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack, base_settings, count_statements, serve

from app.graphql.schema import create_schema
from app.logging_setup import REQUEST_STATE
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
async def test_startup_objects_are_frozen_while_the_app_runs(
    own_sqlite_url: str, tmp_path: Path, tuning: bool
) -> None:
    settings = base_settings(
        database_url=own_sqlite_url,
        var_dir=tmp_path,
        storage_provider="local",
        gc_tuning=tuning,
    )
    async with serve(settings):
        # Start-up's objects: modules, the schema, SQLAlchemy's and botocore's metadata.
        assert (gc.get_freeze_count() > 100_000) is tuning
        # A collection during a request is counted in its Server-Timing (`gc`).
        state: dict[str, Any] = {}
        token = REQUEST_STATE.set(state)
        try:
            gc.collect()
        finally:
            REQUEST_STATE.reset(token)
        assert state["server_timing"]["gc"] > 0
    # Handed back to the collector at shutdown.
    assert gc.get_freeze_count() == 0
