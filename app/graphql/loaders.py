"""Per-request dataloaders: each batch is one `WHERE x IN (...)` query on its own session,
since Strawberry resolves sibling fields and batches concurrently."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from strawberry.dataloader import DataLoader

from app.group_validation import ValidationReport, latest_reports
from app.models import Annotation, DicomExport, Mask, MaskGroup, in_live_group

annotation_table = Annotation.__table__
group_table = MaskGroup.__table__
mask_table = Mask.__table__
export_table = DicomExport.__table__
# Groups deleted within DELETED_GROUP_RETENTION are invisible until restored.
LIVE_GROUP = group_table.c.deleted_at.is_(None)
MASK_ORDER = (mask_table.c.slice_index, func.coalesce(mask_table.c.label_name, ""))


@dataclass(frozen=True, slots=True)
class MaskFilter:
    slice_index_from: int | None = None
    slice_index_to: int | None = None
    label_name: str | None = None
    limit: int | None = None
    offset: int = 0
    # The columns to load (always with mask_group_id); None loads every column.
    columns: tuple[str, ...] | None = None


def _by_key(rows: Sequence[Row[Any]], keys: Sequence[Hashable], column: str) -> list[Any]:
    found = {getattr(row, column): row for row in rows}
    return [found.get(key) for key in keys]


def _grouped(rows: Sequence[Row[Any]], keys: Sequence[Hashable], column: str) -> list[list[Any]]:
    groups: dict[Any, list[Any]] = defaultdict(list)
    for row in rows:
        groups[getattr(row, column)].append(row)
    return [groups.get(key, []) for key in keys]


class Loaders:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker
        self.annotation = DataLoader(self._annotations)
        self.mask_group = DataLoader(self._mask_groups)
        self.mask = DataLoader(self._masks_by_id)
        self.groups_of_annotation = DataLoader(self._groups_of_annotations)
        # Not cached, and every load gets a list of its own that the caller may empty once
        # consumed (MaskGroup.masks does): a finished batch keeps its futures, and so its
        # results, until the request ends, and a big tree must not hold every row and every
        # completed mask at once. A key asked twice in one batch is still one query.
        self.masks_of_group: DataLoader[tuple[int, MaskFilter], list[Row[Any]]] = DataLoader(
            self._masks_of_groups, cache=False
        )
        self.slice_indexes_of_group = DataLoader(self._slice_indexes_of_groups)
        self.validation_of_group = DataLoader(self._validations_of_groups)
        self.dicom_export = DataLoader(self._latest_dicom_exports)

    async def _rows(self, statement: Select[Any]) -> Sequence[Row[Any]]:
        async with self._sessionmaker() as session:
            rows: Sequence[Row[Any]] = (await session.execute(statement)).all()
        return rows

    async def _annotations(self, ids: list[int]) -> list[Row[Any] | None]:
        rows = await self._rows(select(annotation_table).where(annotation_table.c.id.in_(ids)))
        return _by_key(rows, ids, "id")

    async def _mask_groups(self, ids: list[int]) -> list[Row[Any] | None]:
        rows = await self._rows(select(group_table).where(group_table.c.id.in_(ids), LIVE_GROUP))
        return _by_key(rows, ids, "id")

    async def _masks_by_id(self, ids: list[int]) -> list[Row[Any] | None]:
        rows = await self._rows(
            select(mask_table).where(
                mask_table.c.id.in_(ids), in_live_group(mask_table.c.mask_group_id)
            )
        )
        return _by_key(rows, ids, "id")

    async def _groups_of_annotations(self, ids: list[int]) -> list[list[Row[Any]]]:
        rows = await self._rows(
            select(group_table)
            .where(group_table.c.annotation_id.in_(ids), LIVE_GROUP)
            .order_by(group_table.c.id)
        )
        return _grouped(rows, ids, "annotation_id")

    async def _masks_of_groups(self, keys: list[tuple[int, MaskFilter]]) -> list[list[Row[Any]]]:
        # One query per distinct filter in the batch; a tree asks with one filter, so one query.
        by_filter: dict[MaskFilter, list[int]] = defaultdict(list)
        for group_id, mask_filter in dict.fromkeys(keys):
            by_filter[mask_filter].append(group_id)
        results: dict[tuple[int, MaskFilter], list[Row[Any]]] = {}
        for mask_filter, group_ids in by_filter.items():
            rows = await self._rows(_masks_statement(group_ids, mask_filter))
            grouped = _grouped(rows, group_ids, "mask_group_id")
            for group_id, group_rows in zip(group_ids, grouped, strict=True):
                results[(group_id, mask_filter)] = group_rows
        return [list(results[key]) for key in keys]

    async def _validations_of_groups(self, ids: list[int]) -> list[ValidationReport | None]:
        async with self._sessionmaker() as session:
            reports = await latest_reports(session, ids)
        return [reports.get(group_id) for group_id in ids]

    async def _slice_indexes_of_groups(self, ids: list[int]) -> list[set[int]]:
        rows = await self._rows(
            select(mask_table.c.mask_group_id, mask_table.c.slice_index)
            .where(mask_table.c.mask_group_id.in_(ids))
            .distinct()
        )
        found: dict[int, set[int]] = defaultdict(set)
        for row in rows:
            found[row.mask_group_id].add(row.slice_index)
        return [found.get(group_id, set()) for group_id in ids]

    async def _latest_dicom_exports(self, ids: list[int]) -> list[Row[Any] | None]:
        latest = (
            select(func.max(export_table.c.id))
            .where(export_table.c.mask_group_id.in_(ids))
            .group_by(export_table.c.mask_group_id)
        )
        rows = await self._rows(select(export_table).where(export_table.c.id.in_(latest)))
        return _by_key(rows, ids, "mask_group_id")


def _masks_statement(group_ids: list[int], mask_filter: MaskFilter) -> Select[Any]:
    conditions: list[ColumnElement[bool]] = [mask_table.c.mask_group_id.in_(group_ids)]
    if mask_filter.slice_index_from is not None:
        conditions.append(mask_table.c.slice_index >= mask_filter.slice_index_from)
    if mask_filter.slice_index_to is not None:
        conditions.append(mask_table.c.slice_index <= mask_filter.slice_index_to)
    if mask_filter.label_name is not None:
        conditions.append(mask_table.c.label_name == mask_filter.label_name)
    names = mask_table.columns.keys() if mask_filter.columns is None else mask_filter.columns
    columns = [mask_table.c[name] for name in dict.fromkeys(("mask_group_id", *names))]
    if mask_filter.limit is None and mask_filter.offset == 0:
        return select(*columns).where(*conditions).order_by(mask_table.c.mask_group_id, *MASK_ORDER)
    # Paging applies per group, so number each group's masks and cut in one statement.
    position = (
        func.row_number()
        .over(partition_by=mask_table.c.mask_group_id, order_by=MASK_ORDER)
        .label("position")
    )
    numbered = select(*columns, position).where(*conditions).subquery()
    window = [numbered.c.position > mask_filter.offset]
    if mask_filter.limit is not None:
        window.append(numbered.c.position <= mask_filter.offset + mask_filter.limit)
    return (
        select(*(numbered.c[column.name] for column in columns))
        .where(*window)
        .order_by(numbered.c.mask_group_id, numbered.c.position)
    )
