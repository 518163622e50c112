"""How much storage the masks take, by model, annotation, modality or day.

Computed from the counters each mask group stores when its slices are registered (one
GROUP BY over the groups), never by listing the bucket: the database is the record of what
was verified into storage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sqlalchemy import ColumnElement, String, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import MaskGroup


class UsageGrouping(enum.Enum):
    MODEL = "MODEL"
    ANNOTATION = "ANNOTATION"
    MODALITY = "MODALITY"
    DAY = "DAY"


@dataclass(frozen=True, slots=True)
class UsageRow:
    # The model name, annotation id, modality or ISO day (UTC) of creation; "" when unset.
    key: str
    mask_group_count: int
    object_count: int
    total_bytes: int


def _day(dialect: str) -> ColumnElement[str]:
    if dialect == "postgresql":
        return func.to_char(
            func.timezone("UTC", MaskGroup.created_at), literal_column("'YYYY-MM-DD'")
        )
    # SQLite stores UTC timestamps as ISO text: the day is its first ten characters.
    return func.substr(MaskGroup.created_at, 1, 10)


def _key(grouping: UsageGrouping, dialect: str) -> ColumnElement[str]:
    if grouping is UsageGrouping.MODEL:
        return func.coalesce(MaskGroup.model_name, "")
    if grouping is UsageGrouping.ANNOTATION:
        return cast(MaskGroup.annotation_id, String)
    if grouping is UsageGrouping.MODALITY:
        return func.coalesce(MaskGroup.modality, "")
    return _day(dialect)


async def storage_usage(session: AsyncSession, grouping: UsageGrouping) -> list[UsageRow]:
    """Largest first; by day, oldest first."""
    key = _key(grouping, session.get_bind().dialect.name).label("key")
    total_bytes = func.coalesce(func.sum(MaskGroup.total_bytes), 0).label("total_bytes")
    statement = select(
        key,
        func.count().label("mask_group_count"),
        func.coalesce(func.sum(MaskGroup.object_count), 0).label("object_count"),
        total_bytes,
    ).group_by(key)
    if grouping is UsageGrouping.DAY:
        statement = statement.order_by(key)
    else:
        statement = statement.order_by(total_bytes.desc(), key)
    rows = (await session.execute(statement)).all()
    return [
        UsageRow(
            key=row.key,
            mask_group_count=row.mask_group_count,
            object_count=int(row.object_count),
            total_bytes=int(row.total_bytes),
        )
        for row in rows
    ]


def usage_table(grouping: UsageGrouping, rows: list[UsageRow]) -> str:
    """The rows as the `usage` command prints them, with a total line."""
    heading = grouping.value.lower()
    width = max([len(heading), 7, *(len(row.key) for row in rows)])
    lines = [f"{heading:<{width}}  {'groups':>8}  {'objects':>10}  {'bytes':>16}"]
    for row in rows:
        lines.append(
            f"{row.key or '(none)':<{width}}  {row.mask_group_count:>8}  "
            f"{row.object_count:>10}  {row.total_bytes:>16}"
        )
    lines.append(
        f"{'total':<{width}}  {sum(row.mask_group_count for row in rows):>8}  "
        f"{sum(row.object_count for row in rows):>10}  "
        f"{sum(row.total_bytes for row in rows):>16}"
    )
    return "\n".join(lines)
