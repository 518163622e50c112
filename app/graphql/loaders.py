"""Per-request dataloaders: each batch is one `WHERE x IN (...)` query on its own session,
since Strawberry resolves sibling fields and batches concurrently."""

from __future__ import annotations

import asyncio
import functools
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from typing import Any

from sqlalchemy import BindParameter, ColumnElement, Row, Select, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from strawberry.dataloader import DataLoader

from app.group_validation import ValidationReport, latest_reports
from app.models import Annotation, DicomExport, Mask, MaskGroup, in_live_group

annotation_table = Annotation.__table__
group_table = MaskGroup.__table__
mask_table = Mask.__table__
export_table = DicomExport.__table__
# Groups deleted within DELETED_GROUP_RETENTION are invisible until restored.
LIVE_GROUP = group_table.c.deleted_at.is_(None)
# Rows fetched per round trip when streaming a batch of mask lists.
STREAM_ROWS = 5000
# One group's mask rows, once the batch's stream has read them all.
GroupRows = asyncio.Future[list[Row[Any]]]
MASK_ORDER = (mask_table.c.slice_index, func.coalesce(mask_table.c.label_name, ""))

# The loaders' statements of one shape, built once: a statement built per request (its
# IN list, its cache key) cost more than running it on a small tree. `ids` is expanding.
IDS: BindParameter[list[int]] = bindparam("ids", expanding=True)
ANNOTATIONS = select(annotation_table).where(annotation_table.c.id.in_(IDS))
GROUPS = select(group_table).where(group_table.c.id.in_(IDS), LIVE_GROUP)
MASKS = select(mask_table).where(
    mask_table.c.id.in_(IDS), in_live_group(mask_table.c.mask_group_id)
)
GROUPS_OF_ANNOTATIONS = (
    select(group_table)
    .where(group_table.c.annotation_id.in_(IDS), LIVE_GROUP)
    .order_by(group_table.c.id)
)
SLICE_INDEXES = (
    select(mask_table.c.mask_group_id, mask_table.c.slice_index)
    .where(mask_table.c.mask_group_id.in_(IDS))
    .distinct()
)
LATEST_EXPORTS = select(export_table).where(
    export_table.c.id.in_(
        select(func.max(export_table.c.id))
        .where(export_table.c.mask_group_id.in_(IDS))
        .group_by(export_table.c.mask_group_id)
    )
)


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
        self._engine: AsyncEngine = sessionmaker.kw["bind"]
        # PostgreSQL's cursors live in transactions, and its read sessions autocommit
        # (app.db.create_read_sessionmaker): a streamed read takes a BEGIN of its own.
        postgresql = self._engine.dialect.name == "postgresql"
        self._stream_options = {"isolation_level": "READ COMMITTED"} if postgresql else {}
        self.annotation = DataLoader(self._annotations)
        self.mask_group = DataLoader(self._mask_groups)
        self.mask = DataLoader(self._masks_by_id)
        self.groups_of_annotation = DataLoader(self._groups_of_annotations)
        # Not cached, and every load gets a future of its own, resolved with a list of its
        # own that the caller may empty once consumed (MaskGroup.masks does): a big tree must
        # not hold every row and every completed mask at once. The batch's query is streamed
        # and each group's future resolved as soon as its rows are in, so a group's masks are
        # built and completed while the next group's rows arrive. A key asked twice in one
        # batch is still one query.
        self.masks_of_group: DataLoader[tuple[int, MaskFilter], GroupRows] = DataLoader(
            self._masks_of_groups, cache=False
        )
        self._streams: set[asyncio.Task[None]] = set()
        self.slice_indexes_of_group = DataLoader(self._slice_indexes_of_groups)
        self.validation_of_group = DataLoader(self._validations_of_groups)
        self.dicom_export = DataLoader(self._latest_dicom_exports)

    async def _rows(
        self, statement: Select[Any], ids: list[int] | dict[str, Any]
    ) -> Sequence[Row[Any]]:
        """`ids` binds the statements' expanding `ids`, or is every parameter."""
        # A Core connection, not an ORM session: these reads need no identity map, and the
        # session's bookkeeping was a tenth of a small tree's server time.
        async with self._engine.connect() as connection:
            parameters = ids if isinstance(ids, dict) else {"ids": ids}
            rows: Sequence[Row[Any]] = (await connection.execute(statement, parameters)).all()
        return rows

    async def _annotations(self, ids: list[int]) -> list[Row[Any] | None]:
        return _by_key(await self._rows(ANNOTATIONS, ids), ids, "id")

    async def _mask_groups(self, ids: list[int]) -> list[Row[Any] | None]:
        return _by_key(await self._rows(GROUPS, ids), ids, "id")

    async def _masks_by_id(self, ids: list[int]) -> list[Row[Any] | None]:
        return _by_key(await self._rows(MASKS, ids), ids, "id")

    async def _groups_of_annotations(self, ids: list[int]) -> list[list[Row[Any]]]:
        return _grouped(await self._rows(GROUPS_OF_ANNOTATIONS, ids), ids, "annotation_id")

    async def _masks_of_groups(self, keys: list[tuple[int, MaskFilter]]) -> list[GroupRows]:
        loop = asyncio.get_running_loop()
        futures: list[GroupRows] = [loop.create_future() for _ in keys]
        for future in futures:
            # A caller cancelled before reading its future must not log an unread error.
            future.add_done_callback(_read_error)
        stream = asyncio.create_task(self._stream_masks(keys, futures))
        self._streams.add(stream)  # the loop holds tasks weakly
        stream.add_done_callback(self._streams.discard)
        return futures

    async def _stream_masks(
        self, keys: list[tuple[int, MaskFilter]], futures: list[GroupRows]
    ) -> None:
        waiting: dict[tuple[int, MaskFilter], list[GroupRows]] = defaultdict(list)
        for key, future in zip(keys, futures, strict=True):
            waiting[key].append(future)
        # One query per distinct filter in the batch; a tree asks with one filter, so one query.
        by_filter: dict[MaskFilter, list[int]] = defaultdict(list)
        for key_group, mask_filter in waiting:
            by_filter[mask_filter].append(key_group)
        try:
            for mask_filter, group_ids in by_filter.items():
                statement, first_statement, parameters = _masks_statement(mask_filter)
                parameters["ids"] = group_ids
                # Most trees fit in one round trip: asked plainly, they cost no transaction
                # and cursor of their own. A bigger one is asked again, streamed.
                first_parameters = {**parameters, "first_rows": STREAM_ROWS + 1}
                first = await self._rows(first_statement, first_parameters)
                if len(first) <= STREAM_ROWS:
                    for each_group, group_rows in groupby(first, itemgetter(0)):
                        _deliver(waiting.pop((each_group, mask_filter), []), list(group_rows))
                    continue
                del first
                statement = statement.execution_options(yield_per=STREAM_ROWS)
                async with self._sessionmaker() as session:
                    await session.connection(execution_options=self._stream_options)
                    result = await session.stream(statement, parameters)
                    group_id: int | None = None
                    rows: list[Row[Any]] = []
                    async for chunk in result.partitions():
                        # Rows come ordered by group: a new group id means the last is whole.
                        for chunk_group, group_rows in groupby(chunk, itemgetter(0)):
                            if chunk_group != group_id:
                                if group_id is not None:
                                    _deliver(waiting.pop((group_id, mask_filter), []), rows)
                                group_id, rows = chunk_group, []
                            rows.extend(group_rows)
                        del chunk
                    if group_id is not None:
                        _deliver(waiting.pop((group_id, mask_filter), []), rows)
            for pending in waiting.values():  # groups without a row
                _deliver(pending, [])
        except Exception as error:  # noqa: BLE001 - every waiting group raises it
            for pending in waiting.values():
                for future in pending:
                    if not future.done():
                        future.set_exception(error)
        finally:  # cancelled (the server stopping, say): so are the groups still waiting
            for pending in waiting.values():
                for future in pending:
                    future.cancel()

    async def _validations_of_groups(self, ids: list[int]) -> list[ValidationReport | None]:
        async with self._sessionmaker() as session:
            reports = await latest_reports(session, ids)
        return [reports.get(group_id) for group_id in ids]

    async def _slice_indexes_of_groups(self, ids: list[int]) -> list[set[int]]:
        found: dict[int, set[int]] = defaultdict(set)
        for row in await self._rows(SLICE_INDEXES, ids):
            found[row.mask_group_id].add(row.slice_index)
        return [found.get(group_id, set()) for group_id in ids]

    async def _latest_dicom_exports(self, ids: list[int]) -> list[Row[Any] | None]:
        return _by_key(await self._rows(LATEST_EXPORTS, ids), ids, "mask_group_id")


def _deliver(futures: list[GroupRows], rows: list[Row[Any]]) -> None:
    """Each future gets a list of its own (its caller empties it once consumed)."""
    for position, future in enumerate(futures):
        if not future.done():
            future.set_result(rows if position == 0 else list(rows))


def _read_error(future: GroupRows) -> None:
    if not future.cancelled():
        future.exception()


def _masks_statement(
    mask_filter: MaskFilter,
) -> tuple[Select[Any], Select[Any], dict[str, Any]]:
    """The statement for a batch of groups, the same for its first `first_rows` rows, and
    their parameters but `ids` (the group ids) and `first_rows`."""
    statement, first = _masks_statement_of_shape(
        mask_filter.slice_index_from is not None,
        mask_filter.slice_index_to is not None,
        mask_filter.label_name is not None,
        mask_filter.limit is not None,
        mask_filter.offset != 0,
        mask_filter.columns,
    )
    parameters = {
        "slice_from": mask_filter.slice_index_from,
        "slice_to": mask_filter.slice_index_to,
        "label": mask_filter.label_name,
        "offset": mask_filter.offset,
    }
    if mask_filter.limit is not None:
        parameters["last"] = mask_filter.offset + mask_filter.limit
    return statement, first, parameters


# Built once per shape, with bound parameters: built per request (its clauses, its cache key),
# it cost as much as running it on a small tree.
@functools.lru_cache(maxsize=256)
def _masks_statement_of_shape(
    slice_from: bool,
    slice_to: bool,
    label: bool,
    limited: bool,
    offset: bool,
    names: tuple[str, ...] | None,
) -> tuple[Select[Any], Select[Any]]:
    conditions: list[ColumnElement[bool]] = [mask_table.c.mask_group_id.in_(IDS)]
    if slice_from:
        conditions.append(mask_table.c.slice_index >= bindparam("slice_from"))
    if slice_to:
        conditions.append(mask_table.c.slice_index <= bindparam("slice_to"))
    if label:
        conditions.append(mask_table.c.label_name == bindparam("label"))
    names = tuple(mask_table.columns.keys()) if names is None else names
    columns = [mask_table.c[name] for name in dict.fromkeys(("mask_group_id", *names))]
    statement: Select[Any]
    if not limited and not offset:
        statement = (
            select(*columns).where(*conditions).order_by(mask_table.c.mask_group_id, *MASK_ORDER)
        )
    else:
        # Paging applies per group, so number each group's masks and cut in one statement.
        position = (
            func.row_number()
            .over(partition_by=mask_table.c.mask_group_id, order_by=MASK_ORDER)
            .label("position")
        )
        numbered = select(*columns, position).where(*conditions).subquery()
        window = [numbered.c.position > bindparam("offset")]
        if limited:
            window.append(numbered.c.position <= bindparam("last"))
        statement = (
            select(*(numbered.c[column.name] for column in columns))
            .where(*window)
            .order_by(numbered.c.mask_group_id, numbered.c.position)
        )
    return statement, statement.limit(bindparam("first_rows"))
