"""Structural limits checked on the parsed document before authentication and execution, so
an abusive query costs a parse and nothing more: no token lookup, no database."""

from __future__ import annotations

from typing import cast

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

# Far more than any real document nests fragments; far fewer frames than the stack has.
MAX_FRAGMENT_CHAIN = 100


class QueryTooComplex(BadUserInput):
    pass


def check_document(
    query: str, *, max_tokens: int, max_depth: int, max_aliases: int
) -> DocumentNode | None:
    """The parsed document, or None when it does not parse (execution reports that error).
    It keeps its locations: execution runs on it, and validation errors point into it."""
    try:
        document = parse(query, max_tokens=max_tokens)
    except GraphQLSyntaxError as error:
        if "tokens" in error.message and "more than" in error.message:
            raise QueryTooComplex(f"query has more than {max_tokens} tokens") from error
        return None
    fragments = {
        definition.name.value: definition
        for definition in document.definitions
        if isinstance(definition, FragmentDefinitionNode)
    }
    walk = _Walk(fragments, max_aliases)
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            depth, aliases, _ = walk.measure(definition.selection_set)
            if aliases > max_aliases:
                raise QueryTooComplex(f"query has more than {max_aliases} aliases")
            if depth > max_depth:
                raise QueryTooComplex(f"query is deeper than {max_depth} levels")
    return document


class _Walk:
    """Depth and aliases of a selection with fragments expanded at every spread. A fragment
    is measured once per document (its depth and aliases do not depend on where it is
    spread), so spreads that double at every level cost a linear walk; alias counts stop
    growing past the limit. Chains of spreads (F0 spreads F1 spreads F2 ...) are bounded, so
    that no walk over the document, this one or the cost analysis, exhausts the stack."""

    def __init__(self, fragments: dict[str, FragmentDefinitionNode], max_aliases: int) -> None:
        self.fragments = fragments
        self.cap = max_aliases + 1
        # Per fragment: depth, aliases and the longest chain of spreads it starts.
        self.measured: dict[str, tuple[int, int, int]] = {}
        self.nesting = 0

    def measure(self, selection_set: SelectionSetNode | None) -> tuple[int, int, int]:
        if selection_set is None:
            return 0, 0, 0
        deepest = aliases = chain = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                depth, below, spreads = self.measure(selection.selection_set)
                deepest = max(deepest, 1 + depth)
                aliases += below + (1 if selection.alias else 0)
            else:
                if isinstance(selection, FragmentSpreadNode):
                    depth, below, spreads = self.fragment(selection.name.value)
                else:
                    selections = cast(InlineFragmentNode, selection).selection_set
                    depth, below, spreads = self.measure(selections)
                deepest = max(deepest, depth)
                aliases += below
            aliases = min(aliases, self.cap)
            chain = max(chain, spreads)
        return deepest, aliases, chain

    def fragment(self, name: str) -> tuple[int, int, int]:
        if name not in self.measured:
            # A missing fragment or a cycle is a validation error; it counts as empty meanwhile.
            self.measured[name] = (0, 0, 0)
            fragment = self.fragments.get(name)
            if fragment is not None:
                self.nesting += 1
                if self.nesting > MAX_FRAGMENT_CHAIN:
                    raise _chain_too_long()
                depth, aliases, chain = self.measure(fragment.selection_set)
                self.nesting -= 1
                self.measured[name] = (depth, aliases, chain + 1)
        depth, aliases, chain = self.measured[name]
        if self.nesting + chain > MAX_FRAGMENT_CHAIN:
            raise _chain_too_long()
        return depth, aliases, chain


def _chain_too_long() -> QueryTooComplex:
    return QueryTooComplex(f"query spreads fragments more than {MAX_FRAGMENT_CHAIN} levels deep")
