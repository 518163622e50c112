"""Admitted GraphQL documents, kept by query text: a viewer sends the same few documents over
and over, and parsing, the structural limits and validation depend on the text alone (and on
the schema and settings, fixed per process). Parsing and validating the README's tree query
cost more than executing it; a hit costs a dictionary lookup.

What depends on the request still runs on every request: the calculated cost (its list
bounds may come from variables), list lengths and text of the variables, authentication.
Refused documents are not kept: an abusive query costs its parse on every request, as
before."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from graphql import DocumentNode, GraphQLError
from strawberry.extensions import SchemaExtension

from app.graphql.limits import check_document

# Longer texts are admitted without being kept, so that the cache's memory stays bounded: a
# document parses to at most ~270 bytes per character (one-character fields, every token
# kept by the locations), so 128 kept documents hold at most ~35 MB; the viewer's and the
# client's queries are under 400 characters (~15-40 KB parsed).
MAX_KEPT_QUERY_CHARS = 1024


@dataclass(slots=True)
class Admitted:
    """A document within the structural limits, parsed with locations (validation errors
    point into it) and handed to execution as it is, so that it is parsed once."""

    document: DocumentNode
    # Set by PreparedDocument once the document has been validated; [] when it is valid.
    validation_errors: list[GraphQLError] | None = None


class DocumentCache:
    """`admit` is `check_document` with its documents and their validation kept per query
    text, least recently used dropped first; size 0 keeps nothing."""

    def __init__(self, *, size: int, max_tokens: int, max_depth: int, max_aliases: int) -> None:
        self.max_tokens = max_tokens
        self.max_depth = max_depth
        self.max_aliases = max_aliases
        # lru_cache keeps results, never exceptions: refused documents are refused anew.
        self._kept = lru_cache(maxsize=size)(self._admit) if size else self._admit

    def admit(self, query: str) -> Admitted | None:
        """The admitted document; None when the text does not parse (execution reports the
        syntax error). Raises QueryTooComplex as check_document does."""
        if len(query) > MAX_KEPT_QUERY_CHARS:
            return self._admit(query)
        return self._kept(query)

    def _admit(self, query: str) -> Admitted | None:
        document = check_document(
            query,
            max_tokens=self.max_tokens,
            max_depth=self.max_depth,
            max_aliases=self.max_aliases,
        )
        return Admitted(document) if document is not None else None


class PreparedDocument(SchemaExtension):
    """Hands execution the request's admitted document (`Context.admitted`) instead of a
    second parse, and reuses its validation errors once they are known. Validation runs
    with the schema's own rules (with any other extension's added), the first time."""

    def on_parse(self) -> Iterator[None]:
        admitted = getattr(self.execution_context.context, "admitted", None)
        if isinstance(admitted, Admitted):
            self.execution_context.graphql_document = admitted.document
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        admitted = getattr(context.context, "admitted", None)
        if not isinstance(admitted, Admitted) or context.graphql_document is not admitted.document:
            yield
            return
        if admitted.validation_errors is not None:
            # Strawberry skips validation when the errors are already known.
            context.pre_execution_errors = list(admitted.validation_errors)
            yield
            return
        yield
        if context.pre_execution_errors is not None:
            admitted.validation_errors = list(context.pre_execution_errors)
