"""The audit trail: one append-only row per action, written in the action's own transaction,
so there is no action without its record and no record of an action that rolled back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Principal
from app.metrics import count_on_commit
from app.models import AuditEvent, utcnow


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
    count_on_commit(session, action, slice_count, byte_count)
