"""The storage sweeper and its job runner, on SQLite + local disk and PostgreSQL + SeaweedFS
server: deleted prefixes swept again after their URLs expire, upload debris removed, never an
object a registered mask points to, and no double work with two sweepers at once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

from conftest import Stack, content_md5, reset
from flows import create_annotation, create_group, put, upload
from operations import COMPLETE, DELETE_GROUP, REQUEST_URLS
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from app.jobs import Job, JobContext, JobRunner
from app.models import Mask, MaskUpload, StorageDeletion, utcnow
from app.sweeper import SweepReport, sweep

BIN = Path(sys.executable).parent


def _context(stack: Stack, owner: str = "test") -> JobContext:
    return JobContext(stack.settings, stack.sessionmaker, stack.storage, owner)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"pacs_masks_{name}", labels) or 0.0


def _after_grace(stack: Stack) -> datetime:
    """A moment when every object uploaded so far is older than the grace period and every
    URL issued so far has expired."""
    return utcnow() + timedelta(seconds=stack.settings.cleanup_grace + 60)


async def _keys(stack: Stack, prefix: str = "mask/") -> set[str]:
    return {item.key async for page in stack.storage.list_objects(prefix) for item in page}


async def _deletion_records(stack: Stack) -> int:
    async with stack.sessionmaker() as session:
        count = await session.scalar(select(func.count()).select_from(StorageDeletion))
    return count or 0


async def test_a_deleted_prefix_is_swept_again_after_its_urls_expire(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    uploaded = await upload(stack, group_id, range(2), complete=False)
    await stack.data(
        COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}, {"sliceIndex": 1}]}
    )
    deleted = (await stack.data(DELETE_GROUP, {"id": group_id}))["deleteMaskGroup"]
    assert deleted["deletedObjectCount"] == 2
    # A URL issued before the delete can still write: something is left to sweep.
    assert deleted["storageCleanupPending"] is True
    assert await _keys(stack) == set()

    # ... and it does: a late PUT recreates an object under the deleted prefix.
    target, body = uploaded["targets"][0], uploaded["bodies"][0]
    assert await put(stack, target, body) == 200
    assert await _keys(stack) == {target["filePath"]}

    early = await sweep(_context(stack))
    assert early.deletions_processed == 0  # not due before the URL expires
    assert await _keys(stack) == {target["filePath"]}

    late = await sweep(_context(stack), now=datetime.fromisoformat(target["expiresAt"]))
    assert (late.deletions_processed, late.deletions_finished) == (1, 1)
    assert (late.deleted_objects, late.deleted_bytes) == (1, len(body))
    assert await _keys(stack) == set()
    assert await _deletion_records(stack) == 0


async def test_upload_debris_goes_and_registered_masks_stay(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 4)
    uploaded = await upload(stack, group_id, range(4), complete=False)
    await stack.data(
        COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}, {"sliceIndex": 1}]}
    )
    keys = [target["filePath"] for target in uploaded["targets"]]
    debris_bytes = sum(len(uploaded["bodies"][index]) for index in (2, 3))

    # Young objects are uploads in progress, not debris.
    assert (await sweep(_context(stack))).debris_objects == 0

    later = _after_grace(stack)
    preview = await sweep(_context(stack), dry_run=True, now=later)
    assert (preview.debris_objects, preview.debris_bytes) == (2, debris_bytes)
    assert await _keys(stack) == set(keys)

    sweeps, swept = _metric("sweeps_total"), _metric("swept_bytes_total", kind="debris")
    report = await sweep(_context(stack), now=later)
    assert (report.debris_objects, report.debris_bytes) == (2, debris_bytes)
    assert report.errors == []
    assert await _keys(stack) == set(keys[:2])
    # Dry runs are not counted; this real sweep is.
    assert _metric("sweeps_total") == sweeps + 1
    assert _metric("swept_bytes_total", kind="debris") == swept + debris_bytes
    assert await _deletion_records(stack) == 0  # the fences are gone
    async with stack.sessionmaker() as session:
        declarations = await session.scalar(select(func.count()).select_from(MaskUpload))
    assert declarations == 0
    error = await stack.error(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 2}]})
    assert error["extensions"]["code"] == "UPLOAD_INCOMPLETE"
    again = await sweep(_context(stack), now=later)
    assert again.debris_objects == 0


async def test_the_sweeper_never_removes_what_a_completion_registers(stack: Stack) -> None:
    """Sweeps (with every object past the grace period) race completions of the same slices:
    whatever gets registered keeps its object."""
    annotation_id = await create_annotation(stack)
    later = _after_grace(stack)
    for _round in range(3):
        group_id = await create_group(stack, annotation_id, 40)
        await upload(stack, group_id, range(40), complete=False)
        completions = [
            stack.gql(
                COMPLETE,
                {"groupId": group_id, "slices": [{"sliceIndex": i} for i in range(start, 40, 5)]},
            )
            for start in range(5)
        ]
        sweeps = [sweep(_context(stack, f"sweeper-{n}"), now=later) for n in range(2)]
        results = await asyncio.gather(*completions, *sweeps)
        for result in results[:5]:
            assert isinstance(result, dict)
            if "errors" in result:
                assert result["errors"][0]["extensions"]["code"] == "UPLOAD_INCOMPLETE", result
        async with stack.sessionmaker() as session:
            masks = (
                await session.execute(
                    select(Mask.file_path, Mask.file_size).where(
                        Mask.mask_group_id == int(group_id)
                    )
                )
            ).all()
        stored = await stack.storage.stat_objects([mask.file_path for mask in masks])
        assert {key: found.size for key, found in stored.items()} == dict(masks)
        # Each object either registered or swept once, by one of the two sweepers.
        swept = sum(report.debris_objects for report in results[5:])  # type: ignore[union-attr]
        assert len(masks) + swept == 40


async def test_two_sweepers_at_once_do_no_double_work(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    debris = 0
    for _ in range(3):
        group_id = await create_group(stack, annotation_id, 6)
        await upload(stack, group_id, range(6), complete=False)
        debris += 6
    deleted_group = await create_group(stack, annotation_id, 3)
    await upload(stack, deleted_group, range(3))
    await stack.data(DELETE_GROUP, {"id": deleted_group})
    later = _after_grace(stack)

    reports = await asyncio.gather(
        sweep(_context(stack, "a"), now=later), sweep(_context(stack, "b"), now=later)
    )
    assert sum(report.debris_objects for report in reports) == debris
    assert sum(report.deletions_processed for report in reports) == 1
    assert await _keys(stack) == set()
    assert await _deletion_records(stack) == 0

    # Two runners (two replicas) on one database: one of them runs the job.
    runs: list[str] = []

    async def record(context: JobContext) -> SweepReport:
        runs.append(context.owner)
        await asyncio.sleep(0.2)
        return SweepReport(dry_run=False)

    job = Job("test-job", record, "cleanup_enabled", "cleanup_interval_seconds")
    runners = [JobRunner(_context(stack, owner), [job]) for owner in ("a", "b")]
    outcomes = await asyncio.gather(*(runner.run_once(job) for runner in runners))
    assert len(runs) == 1
    assert sorted(outcome is None for outcome in outcomes) == [False, True]
    # Due again only after the interval; the command line may force a run.
    assert await runners[0].run_once(job) is None
    assert await runners[1].run_once(job, force=True) is not None


async def test_a_put_racing_a_delete_is_never_a_server_error(
    sqlite_local_stack: Stack,
) -> None:
    stack = sqlite_local_stack
    try:
        annotation_id = await create_annotation(stack)
        root = stack.settings.resolved_local_storage_dir
        # The prefix removed under the upload (its temp file with it): a coded 409.
        group_id = await create_group(stack, annotation_id, 1)
        status, _ = await _put_during_delete(stack, group_id, root, remove_prefix=True)
        assert status == 409
        # deleteMaskGroup keeps uploads in flight: it lands in the deleted prefix, which the
        # sweeper removes once the URL has expired.
        group_id = await create_group(stack, annotation_id, 1)
        status, pending = await _put_during_delete(stack, group_id, root, remove_prefix=False)
        assert status in (200, 409), status
        assert pending is True
        assert await _deletion_records(stack) == 1
        report = await sweep(_context(stack), now=_after_grace(stack))
        assert report.deletions_finished == 1
        assert await _keys(stack) == set()
    finally:
        await reset(stack)


async def _put_during_delete(
    stack: Stack, group_id: str, root: Path, *, remove_prefix: bool
) -> tuple[int, bool]:
    """A body that stalls after its first MiB (already on disk) while the group is deleted
    (or, with `remove_prefix`, the whole prefix is removed under it), then ends."""
    size = 1536 * 1024
    body = bytes(range(256)) * (size // 256)
    slices = [{"sliceIndex": 0, "fileSize": size, "contentMd5": content_md5(body)}]
    [target] = (await stack.data(REQUEST_URLS, {"groupId": group_id, "slices": slices}))[
        "requestMaskUploadUrls"
    ]
    resume = asyncio.Event()

    async def stalling() -> AsyncIterator[bytes]:
        yield body[: 1024 * 1024 + 1]
        await resume.wait()
        yield body[1024 * 1024 + 1 :]

    headers = {header["name"]: header["value"] for header in target["headers"]}
    headers["Content-Length"] = str(size)
    request = asyncio.create_task(
        stack.storage_client.put(target["url"], content=stalling(), headers=headers)
    )
    folder = root / Path(target["filePath"]).parent
    for _ in range(500):
        if list(folder.glob(".*.part")):
            break
        await asyncio.sleep(0.01)
    assert list(folder.glob(".*.part")), "the first MiB never reached the disk"
    pending = False
    if remove_prefix:
        await stack.storage.delete_prefix(str(Path(target["filePath"]).parent) + "/")
    else:
        deleted = await stack.data(DELETE_GROUP, {"id": group_id})
        pending = deleted["deleteMaskGroup"]["storageCleanupPending"]
    resume.set()
    response = await request
    return response.status_code, pending


def _cleanup(tmp_path: Path, database_url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pacs-masks"), "cleanup", *flags],
        cwd=tmp_path,
        env={
            "PATH": str(BIN),
            "DATABASE_URL": database_url.replace("+aiosqlite", ""),
            "VAR_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cleanup_command_prints_its_report(sqlite_url: str, tmp_path: Path) -> None:
    for flags in (["--dry-run", "--json"], ["--json"]):
        done = _cleanup(tmp_path, sqlite_url, *flags)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["dry_run"] is (flags[0] == "--dry-run")
        assert {"debris_objects", "debris_bytes", "deleted_objects", "deleted_bytes"} <= set(report)
    human = _cleanup(tmp_path, sqlite_url)
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith("pacs-masks: 0 deletion record(s) processed")
