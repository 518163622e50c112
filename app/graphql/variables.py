"""Checks on the raw JSON variables, before graphql-core coerces them: coercion costs ~7 µs
per input object, so a 600,000-item list would hold the event loop for seconds before any
resolver (or role check) could refuse it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graphql import ListTypeNode, NonNullTypeNode, OperationDefinitionNode, TypeNode

from app.errors import BadUserInput


class TooManyItems(BadUserInput):
    pass


def check_list_lengths(
    operation: OperationDefinitionNode, variables: Mapping[str, Any] | None, *, max_items: int
) -> None:
    """Refuses a list variable longer than `max_items` (MAX_SLICES_PER_CALL, the longest list
    any argument accepts), at any list level its declared type has."""
    if not variables:
        return
    for definition in operation.variable_definitions or ():
        name = definition.variable.name.value
        _check(definition.type, variables.get(name), name, max_items)


def _check(type_node: TypeNode, value: Any, name: str, max_items: int) -> None:
    if isinstance(type_node, NonNullTypeNode):
        type_node = type_node.type
    if not isinstance(type_node, ListTypeNode) or not isinstance(value, list):
        return
    if len(value) > max_items:
        raise TooManyItems(
            f"variable ${name} has {len(value)} items; at most {max_items} are accepted "
            "in one call (MAX_SLICES_PER_CALL)",
            field=name,
            items=len(value),
            maxItems=max_items,
        )
    for item in value:
        _check(type_node.type, item, name, max_items)
