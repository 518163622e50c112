"""The validation job: a group completed through the API gets its report by itself, on
SQLite and on PostgreSQL; two runners at once validate each group once, and each report
comes with one VALIDATED event."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import base_settings, open_stack
from sqlalchemy import func, select
from test_validation_job import LATEST, png, upload_bodies

from app.events import EventKind
from app.jobs import JobContext
from app.models import MaskGroup, MaskGroupValidation, ValidationRequest
from app.validation_job import validate_requested

# Generous: the machine running the tests is shared; the job itself runs every 0.2 s.
WAIT_SECONDS = 60.0


@pytest.fixture(params=["sqlite", "postgresql"])
def own_database_url(request: pytest.FixtureRequest) -> str:
    fixture = "own_sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url


async def test_a_completed_group_is_validated_by_itself(
    own_database_url: str, tmp_path: Path
) -> None:
    settings = base_settings(
        database_url=own_database_url,
        var_dir=tmp_path,
        storage_provider="local",
        validation_enabled=True,
        validation_interval_seconds=0.2,
    )
    async with open_stack("validating", settings) as stack:
        group_id, _ = await upload_bodies(stack, 2, {0: png(), 1: png()}, {})
        report: dict[str, Any] | None = None
        deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
        while report is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
            report = (await stack.data(LATEST, {"id": group_id}))["maskGroup"]["validation"]
        assert report is not None, f"no report within {WAIT_SECONDS} s"
        assert (report["status"], report["problemCount"]) == ("VALID", 0)
        # Once is enough: the report is current, so later runs leave the group alone.
        await asyncio.sleep(1.0)
        async with stack.sessionmaker() as session:
            runs = await session.scalar(
                select(func.count())
                .select_from(MaskGroupValidation)
                .where(MaskGroupValidation.mask_group_id == int(group_id))
            )
        assert runs == 1


async def test_two_runners_validate_each_group_once(own_database_url: str, tmp_path: Path) -> None:
    settings = base_settings(
        database_url=own_database_url, var_dir=tmp_path, storage_provider="local"
    )
    async with open_stack("two-runners", settings) as stack:
        groups = [
            await upload_bodies(stack, 3, {0: png(), 1: png(), 2: png()}, {}) for _ in range(6)
        ]
        group_ids = [int(group_id) for group_id, _ in groups]
        async with stack.sessionmaker() as session:
            annotation_ids = set(
                await session.scalars(
                    select(MaskGroup.annotation_id).where(MaskGroup.id.in_(group_ids))
                )
            )
        events = stack.services.events
        streams = [events.subscribe(annotation_id) for annotation_id in annotation_ids]
        try:
            reports = await asyncio.gather(
                *(
                    validate_requested(
                        JobContext(stack.settings, stack.sessionmaker, stack.storage, owner),
                        events,
                    )
                    for owner in ("runner-a", "runner-b")
                )
            )
            seen: list[int] = []
            for stream in streams:
                async with asyncio.timeout(10):
                    while len(seen) < len(group_ids):
                        try:
                            async with asyncio.timeout(1):
                                event = await anext(stream)
                        except TimeoutError:
                            break
                        if event.kind is EventKind.VALIDATED:
                            seen.append(event.mask_group_id)
        finally:
            for stream in streams:
                await stream.aclose()
        assert sorted(mine for mine in seen if mine in group_ids) == sorted(group_ids)
        # A third run finds nothing of these groups to do: their reports are current.
        await validate_requested(
            JobContext(stack.settings, stack.sessionmaker, stack.storage, "runner-c"), events
        )
        async with stack.sessionmaker() as session:
            counts = dict(
                (
                    await session.execute(
                        select(MaskGroupValidation.mask_group_id, func.count())
                        .where(MaskGroupValidation.mask_group_id.in_(group_ids))
                        .group_by(MaskGroupValidation.mask_group_id)
                    )
                ).all()
            )
            left = await session.scalar(
                select(func.count())
                .select_from(ValidationRequest)
                .where(ValidationRequest.mask_group_id.in_(group_ids))
            )
        assert counts == dict.fromkeys(group_ids, 1)
        assert left == 0
        assert sum(report.valid for report in reports) >= len(group_ids)
