"""The audit trail: one append-only row per action, written in the action's own transaction,
so there is no action without its record and no record of an action that rolled back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.metrics import count_on_commit
from app.models import AuditEvent, MaskGroup, utcnow
from app.principals import Principal, Role, require
from app.validation import check_page, parse_id


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
    group: MaskGroup | None = None,
    annotation_id: int | None = None,
    mask_group_id: int | None = None,
    slice_count: int | None = None,
    byte_count: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    if group is not None:
        annotation_id, mask_group_id = group.annotation_id, group.id
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
    count_on_commit(session, action, slice_count, byte_count)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    # Ids as the client sent them: parsed after the role check, so strangers learn nothing.
    annotation_id: str | None
    mask_group_id: str | None
    actor: str | None
    action: str | None


AUDIT_PAGE_MAX = 1000


async def list_audit_events(
    session: AsyncSession, reader: Principal, where: AuditFilter, *, limit: int, offset: int
) -> Sequence[Row[Any]]:
    """Newest first; ADMIN only."""
    require(reader, Role.ADMIN)
    check_page(limit, offset, max_limit=AUDIT_PAGE_MAX)
    table = AuditEvent.__table__
    statement = table.select()
    for column, value in (
        (table.c.annotation_id, _optional_id("annotationId", where.annotation_id)),
        (table.c.mask_group_id, _optional_id("maskGroupId", where.mask_group_id)),
        (table.c.actor, where.actor),
        (table.c.action, where.action),
    ):
        if value is not None:
            statement = statement.where(column == value)
    statement = statement.order_by(table.c.id.desc()).limit(limit).offset(offset)
    return (await session.execute(statement)).all()


def _optional_id(field: str, value: str | None) -> int | None:
    return parse_id(field, value) if value is not None else None
