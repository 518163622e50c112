"""A frozen storage server must not take the database down: storage calls are bounded, and no
storage call runs while a transaction holds a lock or a pooled connection."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import Stack, open_stack, reset, unavailable
from flows import create_annotation, create_group, upload
from operations import COMPLETE, DELETE_GROUP, TREE
from sqlalchemy import select
from storage_servers import _answers_http, _free_port, s3_settings

from app.jobs import JobContext
from app.models import StorageDeletion, utcnow
from app.sweeper import sweep

STORAGE_TIMEOUTS = {
    "storage_connect_timeout": 1.0,
    "storage_read_timeout": 1.5,
    "storage_max_attempts": 2,
    # /readyz waits this long for the frozen storage; it must stay responsive.
    "readiness_timeout": 1.0,
}
CONCURRENT_COMPLETIONS = 32
# Not a speed test: a query that waited for a pooled connection or a lock would take the
# pool timeout (30 s) or the storage bound, far beyond this.
RESPONSIVE_SECONDS = 2.0


@pytest.fixture
def moto_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """moto's S3 server in a process of its own, so the test can freeze it (SIGSTOP)."""
    port = _free_port()
    log = (tmp_path / "moto.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not _answers_http("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                unavailable(f"moto server did not start: {(tmp_path / 'moto.log').read_text()}")
            time.sleep(0.05)
        yield process, f"http://127.0.0.1:{port}"
    finally:
        # A stopped process ignores SIGTERM until it is continued.
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
async def frozen_storage_stack(
    postgres_url: str, moto_process: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> AsyncIterator[tuple[Stack, subprocess.Popen[bytes]]]:
    process, endpoint = moto_process
    settings = s3_settings(endpoint, "testing", "testing", "pacs-masks").model_copy(
        # /readyz asks storage too: its check gives up well inside the responsiveness bound.
        update={
            "database_url": postgres_url,
            "var_dir": tmp_path,
            "readiness_timeout": 0.5,
            **STORAGE_TIMEOUTS,
        }
    )
    async with open_stack("postgresql-frozen-s3", settings) as stack:
        try:
            yield stack, process
        finally:
            os.kill(process.pid, signal.SIGCONT)
            await reset(stack)


async def _timed(coroutine: object) -> tuple[float, object]:
    started = time.monotonic()
    result = await coroutine  # type: ignore[misc]
    return time.monotonic() - started, result


async def test_frozen_storage_fails_fast_and_the_database_keeps_answering(
    frozen_storage_stack: tuple[Stack, subprocess.Popen[bytes]],
) -> None:
    stack, process = frozen_storage_stack
    bound = stack.settings.storage_call_deadline
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 40)
    await upload(stack, group_id, range(40), complete=False)

    os.kill(process.pid, signal.SIGSTOP)
    started = time.monotonic()
    completions = [
        asyncio.create_task(
            stack.gql(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": index}]})
        )
        for index in range(CONCURRENT_COMPLETIONS)
    ]
    await asyncio.sleep(0.5)
    # While 32 completions wait on storage: queries that need no storage answer at once.
    for _ in range(3):
        elapsed, me = await _timed(stack.data("{ me { user } }", as_="reader"))
        assert elapsed < RESPONSIVE_SECONDS
        assert me == {"me": {"user": "reader-1"}}
        elapsed, tree = await _timed(stack.data(TREE, {"id": annotation_id}, as_="reader"))
        assert elapsed < RESPONSIVE_SECONDS
        assert tree["annotation"]["maskGroups"][0]["id"] == group_id  # type: ignore[index]
        elapsed, ready = await _timed(stack.client.get("/readyz"))
        assert elapsed < RESPONSIVE_SECONDS
        # Not ready because of storage, never because of the database.
        parts = ready.json()  # type: ignore[attr-defined]
        assert parts["database"] == "ok", parts
        assert parts["migrations"] == "ok", parts
        assert parts["storage"] != "ok", parts
    results = await asyncio.gather(*completions)
    took = time.monotonic() - started
    codes = {result["errors"][0]["extensions"]["code"] for result in results}
    assert codes == {"STORAGE_UNAVAILABLE"}
    # Every call within the configured bound (all attempts), plus the server's own work.
    assert took < bound + 5, (took, bound)

    os.kill(process.pid, signal.SIGCONT)
    done = await stack.data(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}]})
    assert done["completeMaskUpload"]["maskGroup"]["uploadedSliceCount"] == 1


async def test_a_deletion_storage_refused_is_retried_with_backoff(
    frozen_storage_stack: tuple[Stack, subprocess.Popen[bytes]],
) -> None:
    stack, process = frozen_storage_stack
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 3)
    uploaded = await upload(stack, group_id, range(3))
    keys = [mask["filePath"] for mask in uploaded["masks"]]

    os.kill(process.pid, signal.SIGSTOP)
    elapsed, deleted = await _timed(stack.data(DELETE_GROUP, {"id": group_id}))
    assert elapsed < stack.settings.storage_call_deadline + 5
    assert deleted["deleteMaskGroup"]["storageCleanupPending"] is True  # type: ignore[index]
    os.kill(process.pid, signal.SIGCONT)
    async with stack.sessionmaker() as session:
        [record] = (await session.scalars(select(StorageDeletion))).all()
    assert record.attempts == 1
    assert record.last_error
    assert record.not_before > utcnow()  # backing off
    assert set(await stack.storage.stat_objects(keys)) == set(keys)

    context = JobContext(stack.settings, stack.sessionmaker, stack.storage, "test")
    assert (await sweep(context)).deletions_processed == 0
    # Once the backoff and the URLs issued before the delete have passed:
    report = await sweep(context, now=utcnow() + timedelta(hours=2))
    assert (report.deletions_processed, report.deletions_finished) == (1, 1)
    assert report.deleted_objects == 3
    assert await stack.storage.stat_objects(keys) == {}
    async with stack.sessionmaker() as session:
        assert (await session.scalars(select(StorageDeletion))).all() == []
