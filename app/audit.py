"""The audit trail: one append-only row per action, written in the action's own transaction,
so there is no action without its record and no record of an action that rolled back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Row, Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import AuditEvent, utcnow
from app.principals import Principal, Role, require
from app.validation import check_page, parse_id

AUDIT_EVENT = cast(Table, AuditEvent.__table__)
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Actor:
    principal: Principal
    request_id: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None


async def record(
    session: AsyncSession,
    actor: Actor,
    action: str,
    *,
    annotation_id: int | None = None,
    mask_group_id: int | None = None,
    slice_count: int | None = None,
    byte_count: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    await session.execute(
        insert(AuditEvent).values(
            occurred_at=utcnow(),
            actor=actor.principal.user,
            action=action,
            annotation_id=annotation_id,
            mask_group_id=mask_group_id,
            slice_count=slice_count,
            byte_count=byte_count,
            request_id=actor.request_id,
            client_ip=actor.client_ip,
            user_agent=(actor.user_agent or "")[:512] or None,
            detail=detail,
        )
    )


@dataclass(frozen=True, slots=True)
class AuditFilter:
    # Ids as the client sent them: parsed after the role check, so strangers learn nothing.
    annotation_id: str | None = None
    mask_group_id: str | None = None
    actor: str | None = None
    action: str | None = None


async def list_audit_events(
    session: AsyncSession, reader: Principal, where: AuditFilter, *, limit: int, offset: int
) -> Sequence[Row[Any]]:
    """Newest first; ADMIN only."""
    require(reader, Role.ADMIN)
    check_page(limit, offset, max_limit=MAX_PAGE)
    statement = AUDIT_EVENT.select()
    for column, value in (
        (AUDIT_EVENT.c.annotation_id, _optional_id("annotationId", where.annotation_id)),
        (AUDIT_EVENT.c.mask_group_id, _optional_id("maskGroupId", where.mask_group_id)),
        (AUDIT_EVENT.c.actor, where.actor),
        (AUDIT_EVENT.c.action, where.action),
    ):
        if value is not None:
            statement = statement.where(column == value)
    statement = statement.order_by(AUDIT_EVENT.c.id.desc()).limit(limit).offset(offset)
    return (await session.execute(statement)).all()


def _optional_id(field: str, value: str | None) -> int | None:
    return parse_id(field, value) if value is not None else None
