"""The background job runner: periodic runs, a failing run retried at the next interval, a
clean stop, and the sweeper started by `serve` itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import base_settings, open_stack
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.db import create_engine, create_sessionmaker
from app.jobs import (
    WOKEN_RETRY_SECONDS,
    Job,
    JobContext,
    JobRunner,
    acquire_lease,
    release_lease,
)
from app.main import open_storage
from app.models import JobRun, utcnow
from app.storage import Storage


async def test_a_failing_run_is_logged_and_retried_then_the_runner_stops(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = base_settings(
        database_url=database_url,
        var_dir=tmp_path,
        cleanup_enabled=True,
        cleanup_interval_seconds=0.2,
    )
    engine = create_engine(settings.resolved_database_url)
    storage = await open_storage(settings)
    calls: list[int] = []
    stopped = asyncio.Event()

    async def flaky(context: JobContext) -> str:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("storage hiccup")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return "unreachable"

    name = f"flaky-{tmp_path.name}"
    job = Job(name, flaky, "cleanup_enabled", "cleanup_interval_seconds")
    sessionmaker = create_sessionmaker(engine)
    runner = JobRunner(JobContext(settings, sessionmaker, storage, "test"), [job])
    try:
        with caplog.at_level(logging.ERROR, logger="app.jobs"):
            runner.start()
            for _ in range(100):
                if len(calls) >= 2:
                    break
                await asyncio.sleep(0.05)
            assert len(calls) == 2  # the failure did not stop the loop
            logged = [record.exc_info[1] for record in caplog.records if record.exc_info]
            assert [str(error) for error in logged] == ["storage hiccup"]
            await asyncio.wait_for(runner.stop(), timeout=5)
        assert stopped.is_set()
        async with sessionmaker() as session:
            run = await session.scalar(select(JobRun).where(JobRun.name == name))
        assert run is not None
        # Released on the way out, with what stopped it.
        assert run.locked_until is None
        assert run.last_error is not None
        assert "CancelledError" in run.last_error
    finally:
        await storage.aclose()
        await engine.dispose()


async def test_serve_runs_the_sweeper_periodically(own_sqlite_url: str, tmp_path: Path) -> None:
    settings = base_settings(
        database_url=own_sqlite_url,
        var_dir=tmp_path,
        cleanup_enabled=True,
        cleanup_interval_seconds=0.2,
    )
    async with open_stack("sqlite-sweeping", settings) as stack:
        for _ in range(100):
            async with stack.sessionmaker() as session:
                run = await session.scalar(select(JobRun).where(JobRun.name == "storage-cleanup"))
            if run is not None and run.last_finished_at is not None:
                break
            await asyncio.sleep(0.05)
        assert run is not None
        assert run.last_finished_at is not None
        assert run.last_error is None


@dataclass
class Hourly:
    """A job context whose jobs are due once an hour: what runs sooner was woken."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    storage: Storage


@pytest.fixture
async def hourly(database_url: str, tmp_path: Path) -> AsyncIterator[Hourly]:
    settings = base_settings(
        database_url=database_url,
        var_dir=tmp_path,
        cleanup_enabled=True,
        cleanup_interval_seconds=3600,
    )
    engine = create_engine(settings.resolved_database_url)
    storage = await open_storage(settings)
    try:
        yield Hourly(settings, create_sessionmaker(engine), storage)
    finally:
        await storage.aclose()
        await engine.dispose()


async def test_wake_runs_a_job_now_rather_than_at_its_interval(
    hourly: Hourly, tmp_path: Path
) -> None:
    runs = asyncio.Queue[int]()

    async def count(context: JobContext) -> int:
        runs.put_nowait(runs.qsize())
        return runs.qsize()

    name = f"woken-{tmp_path.name}"
    job = Job(name, count, "cleanup_enabled", "cleanup_interval_seconds")
    context = JobContext(hourly.settings, hourly.sessionmaker, hourly.storage, "test")
    runner = JobRunner(context, [job])
    try:
        runner.start()
        # Twice: the second run is not due for an hour, and is run anyway.
        for _ in range(2):
            runner.wake(name)
            await asyncio.wait_for(runs.get(), timeout=5)
        assert runs.empty()
    finally:
        await runner.stop()


async def test_a_wake_while_another_replica_holds_the_lease_runs_once_it_is_released(
    hourly: Hourly, tmp_path: Path
) -> None:
    # The other replica's run may have read before the work that woke us was committed: the
    # woken runner must run after it, not a whole interval (here an hour) later.
    sessionmaker = hourly.sessionmaker
    runs = asyncio.Queue[str]()

    async def record(context: JobContext) -> str:
        runs.put_nowait(context.owner)
        return context.owner

    name = f"held-{tmp_path.name}"
    job = Job(name, record, "cleanup_enabled", "cleanup_interval_seconds")
    runner = JobRunner(JobContext(hourly.settings, sessionmaker, hourly.storage, "woken"), [job])
    try:
        held = await acquire_lease(
            sessionmaker, name, "other", now=utcnow(), lease=timedelta(hours=1), force=True
        )
        assert held
        runner.start()
        runner.wake(name)
        # The woken run found the lease taken; nothing runs while the other holds it.
        await asyncio.sleep(WOKEN_RETRY_SECONDS * 2.5)
        assert runs.empty()
        await release_lease(sessionmaker, name, "other", None)
        assert await asyncio.wait_for(runs.get(), timeout=WOKEN_RETRY_SECONDS * 10) == "woken"
    finally:
        await runner.stop()
