"""The columns a list field's selection reads, so that a big list loads only those.

A mask tree selects about half of a mask's columns; the others (created_at above all: asyncpg
builds a timezone-aware datetime for every row) cost more to fetch and decode than all the
rest. Whatever is not known to need only certain columns loads every column."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from strawberry.types.nodes import SelectedField, Selection

TYPENAME = "__typename"


def selected_names(current: Iterable[Selection]) -> set[str]:
    """GraphQL names of the fields selected under the current field (`info.selected_fields`:
    its nodes), through fragments and inline fragments. Fields under @skip/@include count as
    selected: loading a column too many is harmless."""
    names: set[str] = set()
    for node in current:
        names |= _names(node.selections)
    return names


def _names(selections: Iterable[Selection]) -> set[str]:
    names: set[str] = set()
    for selection in selections:
        if isinstance(selection, SelectedField):
            names.add(selection.name)
        else:
            names |= _names(selection.selections)
    return names


def needed_columns(
    names: Iterable[str], columns_of: Mapping[str, tuple[str, ...]]
) -> tuple[str, ...] | None:
    """The columns that `names` read (sorted, a stable loader key), or None for every column
    when one of them is not in `columns_of`."""
    needed: set[str] = set()
    for name in names:
        if name == TYPENAME:
            continue
        columns = columns_of.get(name)
        if columns is None:
            return None
        needed.update(columns)
    return tuple(sorted(needed))
