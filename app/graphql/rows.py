"""Output types built from database rows: Core rows (loaders) and ORM entities (mutations)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Self

import strawberry
from strawberry.types.base import StrawberryOptional
from strawberry.types.enum import StrawberryEnumDefinition
from strawberry.types.private import is_private


def _row_converter(field_type: Any) -> Callable[[Any], Any] | None:
    """How a column value becomes the field's value; None when it is taken as it is."""
    if isinstance(field_type, StrawberryOptional):
        field_type = field_type.of_type
    if field_type is strawberry.ID:
        convert: Callable[[Any], Any] = str
    elif isinstance(field_type, StrawberryEnumDefinition):
        # The models' enums share the values of the GraphQL ones; Core rows may hold strings.
        wrapped = field_type.wrapped_cls
        convert = lambda value: wrapped(getattr(value, "value", value))
    else:
        return None
    return lambda value: None if value is None else convert(value)


class FromRow:
    """`from_row` for output types: every plain field copied from the row's attribute of the
    same name (ids as strings, enums by value); resolver fields are left to their resolvers.

    Trees build thousands of these per request, so the instance's `__dict__` is filled in
    directly rather than through the dataclass `__init__` (several times cheaper): a Core
    row's values are taken by position in one C call, and only ids and enums go through a
    converter. A row of some columns only (a list loaded for its selection) gives only
    those fields; private fields keep their class defaults, as `__init__` would give them."""

    _builders: ClassVar[dict[tuple[type, tuple[str, ...] | None], Callable[[Any], Any]]] = {}

    @classmethod
    def from_row(cls, row: Any) -> Self:
        return cls._builder(row)(row)

    @classmethod
    def from_rows(cls, rows: Sequence[Any], **extra: Any) -> list[Self]:
        """One instance per row, all rows of one result; `extra` private fields on each."""
        if not rows:
            return []
        build = cls._builder(rows[0], extra)
        return [build(row) for row in rows]

    @classmethod
    def _builder(cls, sample: Any, extra: Mapping[str, Any] | None = None) -> Callable[[Any], Self]:
        # A Core row has _fields (its column names); ORM entities have attributes.
        columns: tuple[str, ...] | None = getattr(sample, "_fields", None)
        build = FromRow._builders.get((cls, columns)) if not extra else None
        if build is None:
            build = _row_builder(cls, columns, dict(extra or {}))
            if not extra:
                FromRow._builders[(cls, columns)] = build
        return build


def _row_builder(
    cls: type[FromRow], columns: tuple[str, ...] | None, extra: dict[str, Any]
) -> Callable[[Any], Any]:
    fields = [
        field
        for field in cls.__strawberry_definition__.fields  # type: ignore[attr-defined]
        if field.base_resolver is None and not is_private(field.type)
    ]
    if columns is not None:
        fields = [field for field in fields if field.python_name in columns]
    names = tuple(field.python_name for field in fields)
    converters = [
        (field.python_name, convert)
        for field in fields
        if (convert := _row_converter(field.type)) is not None
    ]
    values_of: Callable[[Any], Iterable[Any]]
    if columns is None:
        values_of = operator.attrgetter(*names)
    else:
        values_of = operator.itemgetter(*(columns.index(name) for name in names))
    if len(names) == 1:  # the getters give a bare value for one name, not a 1-tuple
        one = values_of
        values_of = lambda row: (one(row),)
    new = object.__new__

    def build(row: Any) -> Any:
        values = dict(zip(names, values_of(row), strict=True))
        for name, convert in converters:
            values[name] = convert(values[name])
        if extra:
            values.update(extra)
        instance = new(cls)
        instance.__dict__ = values
        return instance

    return build
