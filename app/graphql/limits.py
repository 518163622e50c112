"""Structural limits checked on the parsed document before authentication and execution, so
an abusive query costs a parse and nothing more: no token lookup, no database."""

from __future__ import annotations

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    parse,
)
from graphql.error import GraphQLSyntaxError

from app.errors import BadUserInput


class QueryTooComplex(BadUserInput):
    pass


def check_document(
    query: str, *, max_tokens: int, max_depth: int, max_aliases: int
) -> DocumentNode | None:
    """The parsed document, or None when it does not parse (execution reports that error)."""
    try:
        document = parse(query, max_tokens=max_tokens, no_location=True)
    except GraphQLSyntaxError as error:
        if "tokens" in error.message and "more than" in error.message:
            raise QueryTooComplex(f"query has more than {max_tokens} tokens") from error
        return None
    fragments = {
        definition.name.value: definition
        for definition in document.definitions
        if isinstance(definition, FragmentDefinitionNode)
    }
    aliases = 0
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode | FragmentDefinitionNode):
            aliases += _aliases(definition.selection_set)
            if aliases > max_aliases:
                raise QueryTooComplex(f"query has more than {max_aliases} aliases")
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            depth = _depth(definition.selection_set, fragments, frozenset(), max_depth)
            if depth > max_depth:
                raise QueryTooComplex(f"query is deeper than {max_depth} levels")
    return document


def _aliases(selection_set: SelectionSetNode | None) -> int:
    if selection_set is None:
        return 0
    count = 0
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            count += 1 if selection.alias else 0
            count += _aliases(selection.selection_set)
        elif isinstance(selection, InlineFragmentNode):
            count += _aliases(selection.selection_set)
    return count


def _depth(
    selection_set: SelectionSetNode | None,
    fragments: dict[str, FragmentDefinitionNode],
    visiting: frozenset[str],
    limit: int,
) -> int:
    if selection_set is None:
        return 0
    deepest = 0
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            below = _depth(selection.selection_set, fragments, visiting, limit - 1)
            deepest = max(deepest, 1 + below if selection.selection_set else 1)
        elif isinstance(selection, InlineFragmentNode):
            deepest = max(deepest, _depth(selection.selection_set, fragments, visiting, limit))
        elif isinstance(selection, FragmentSpreadNode):
            name = selection.name.value
            fragment = fragments.get(name)
            # A cycle is a validation error; counting it once is enough here.
            if fragment is not None and name not in visiting:
                deepest = max(
                    deepest, _depth(fragment.selection_set, fragments, visiting | {name}, limit)
                )
        if deepest > limit:
            break  # no need to walk the rest of a document that is already too deep
    return deepest
