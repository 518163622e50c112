"""The validation job: a group that becomes COMPLETE is validated by itself, in the
background (app/group_validation.py does the checking; `validateMaskGroup` re-runs it on
demand).

Each run is safe with several replicas, and with two runs at once:

1. **Requests.** One INSERT … SELECT adds a `mask_group_validation_request` row for every
   COMPLETE group whose latest report is missing or saw fewer masks than the group has now
   (masks are only ever added), unless the group has a request already (one row per group,
   a conflicting insert of another run is ignored).
2. **Claims.** Due requests are claimed with `jobs.claim_due` (`FOR UPDATE SKIP LOCKED`,
   due time pushed past a lease in the claiming transaction): no two runs take one group.
3. **Work.** Each claimed group is validated with no transaction open; the transaction that
   stores its report deletes the request and publishes VALIDATED. A failure (storage
   unreachable, say) backs the request off; a group deleted meanwhile takes its request with
   it (the foreign key cascades).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, bindparam, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import transaction
from app.errors import AppError, NotFound
from app.events import EventBus
from app.group_validation import validate_group
from app.jobs import JobContext, claim_due
from app.models import (
    Mask,
    MaskGroup,
    MaskGroupStatus,
    MaskGroupValidation,
    UTCDateTime,
    ValidationRequest,
    ValidationStatus,
    utcnow,
)

logger = logging.getLogger(__name__)

GROUP = cast(Table, MaskGroup.__table__)
MASK = cast(Table, Mask.__table__)
VALIDATION = cast(Table, MaskGroupValidation.__table__)
# Small: the claimed groups wait their turn under one lease.
CLAIM_BATCH = 4
BACKOFF_BASE_SECONDS = 30.0
BACKOFF_MAX_SECONDS = 3600.0


@dataclass
class ValidationRunReport:
    requested: int = 0
    valid: int = 0
    invalid: int = 0
    # Deleted while waiting or while being validated.
    gone: int = 0
    failed: int = 0

    def __bool__(self) -> bool:
        # An idle run has nothing to report (`JobRunner` logs it at debug level only).
        return bool(self.requested or self.valid or self.invalid or self.gone or self.failed)


def _lease(context: JobContext) -> timedelta:
    # Long enough to stream a large group: a claimed request is not taken again meanwhile.
    return timedelta(seconds=max(900.0, 4 * context.settings.storage_call_deadline))


async def request_validations(session: AsyncSession, now: datetime) -> int:
    """Requests for every COMPLETE group without a current report; how many were added."""
    seen = (
        select(VALIDATION.c.mask_count)
        .where(VALIDATION.c.mask_group_id == GROUP.c.id)
        .order_by(VALIDATION.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    present = (
        select(func.count()).select_from(MASK).where(MASK.c.mask_group_id == GROUP.c.id)
    ).scalar_subquery()
    waiting = select(ValidationRequest.mask_group_id).where(
        ValidationRequest.mask_group_id == GROUP.c.id
    )
    due = select(GROUP.c.id, bindparam("now", now, type_=UTCDateTime()), literal(0)).where(
        GROUP.c.status == MaskGroupStatus.COMPLETE,
        ~waiting.exists(),
        func.coalesce(seen, -1) != present,
    )
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(ValidationRequest)
        .from_select(["mask_group_id", "due_at", "attempts"], due)
        .on_conflict_do_nothing()
    )
    result = await session.execute(statement)
    return max(getattr(result, "rowcount", 0), 0)


async def _back_off(context: JobContext, group_id: int, error: Exception) -> None:
    async with transaction(context.sessionmaker) as session:
        request = await session.get(ValidationRequest, group_id)
        if request is None:
            return
        delay = min(BACKOFF_BASE_SECONDS * 2**request.attempts, BACKOFF_MAX_SECONDS)
        await session.execute(
            update(ValidationRequest)
            .where(ValidationRequest.mask_group_id == group_id)
            .values(
                attempts=request.attempts + 1,
                due_at=utcnow() + timedelta(seconds=delay),
                last_error=f"{type(error).__name__}: {error}"[:1000],
            )
        )


async def validate_requested(context: JobContext, events: EventBus) -> ValidationRunReport:
    report = ValidationRunReport()
    while True:
        now = utcnow()
        async with transaction(context.sessionmaker) as session:
            report.requested += await request_validations(session, now)
            claimed = [
                request.mask_group_id
                for request in await claim_due(
                    session,
                    ValidationRequest,
                    ValidationRequest.due_at,
                    now=now,
                    lease=_lease(context),
                    limit=CLAIM_BATCH,
                )
            ]
        if not claimed:
            return report
        for group_id in claimed:
            try:
                result = await validate_group(
                    context.sessionmaker, context.storage, group_id, events=events
                )
            except NotFound:
                report.gone += 1
            except AppError as error:
                logger.warning("validation of mask group %s failed: %s", group_id, error)
                report.failed += 1
                await _back_off(context, group_id, error)
            else:
                if result.status is ValidationStatus.VALID:
                    report.valid += 1
                else:
                    report.invalid += 1


async def validation_job(context: JobContext) -> ValidationRunReport:
    """The periodic job (`app.main.JOBS`)."""
    if context.events is None:
        raise RuntimeError("the validation job publishes events: its JobContext needs events")
    return await validate_requested(context, context.events)
