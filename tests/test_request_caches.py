"""What a request reuses from earlier ones gives what the standard path gives: kept documents
(app.graphql.documents) answer and refuse as parsing and validating anew does, and kept API
tokens (app.tokens.TokenCache) stop working within TOKEN_CACHE_SECONDS of their revocation."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from conftest import Stack, base_settings, count_statements, serve
from test_cost import readme_tree_query

from app.audit import Actor
from app.auth import authenticate
from app.db import transaction
from app.errors import Unauthenticated
from app.graphql.context import Context
from app.graphql.documents import MAX_KEPT_QUERY_CHARS, DocumentCache, PreparedDocument
from app.graphql.schema import create_schema
from app.graphql.view import format_error
from app.models import utcnow
from app.principals import Principal, Role
from app.tokens import TokenCache, create_token, revoke_token

# Valid, one operation of two, invalid in validation (one error, two errors, a fragment
# cycle), refused at coercion of a variable (wrong, missing), an unknown field below a list:
# each answer, errors with their locations, must not depend on the cache.
DOCUMENTS: list[tuple[str, dict[str, Any] | None, str | None]] = [
    ("{ me { user role } }", None, None),
    ("query Who { me { user } }\nquery Role { me { role } }", None, "Role"),
    ("{ me { user nosuch } }", None, None),
    ("{ me { nosuch }\n  annotation { id } }", None, None),
    (
        "{ me { ...A } } fragment A on Principal { ...B } fragment B on Principal { ...A }",
        None,
        None,
    ),
    ("query($id: ID!) { annotation(id: $id) { id } }", {"id": [1, 2]}, None),
    ("query($id: ID!) { annotation(id: $id) { id } }", {}, None),
    ("query($id: ID!) { annotation(id: $id) { maskGroups { masks { nosuch } } } }", None, None),
]


def _context(stack: Stack, admitted: Any = None) -> Context:
    services = stack.services
    return Context(
        settings=stack.settings,
        sessionmaker=stack.sessionmaker,
        storage=stack.storage,
        jobs=services.jobs,
        actor=Actor(Principal("reader-1", Role.READER), request_id="test"),
        events=services.events,
        view_urls=services.view_urls,
        admitted=admitted,
    )


def _answer(result: Any) -> str:
    errors = [format_error(error, "test") for error in result.errors or ()]
    return json.dumps({"data": result.data, "errors": errors}, sort_keys=True)


@pytest.mark.parametrize(("query", "variables", "operation_name"), DOCUMENTS)
async def test_kept_documents_execute_as_parsed_and_validated_anew(
    sqlite_local_stack: Stack,
    query: str,
    variables: dict[str, Any] | None,
    operation_name: str | None,
) -> None:
    stack = sqlite_local_stack
    standard = create_schema()  # Strawberry parses and validates every time
    expected = _answer(
        await standard.execute(
            query,
            variable_values=variables,
            context_value=_context(stack),
            operation_name=operation_name,
        )
    )
    prepared = create_schema(extensions=[PreparedDocument])
    cache = DocumentCache(size=8, max_tokens=20_000, max_depth=15, max_aliases=50)
    answers = []
    for _ in range(3):  # a miss, then hits with the validation kept
        admitted = cache.admit(query)
        assert admitted is not None
        result = await prepared.execute(
            query,
            variable_values=variables,
            context_value=_context(stack, admitted),
            operation_name=operation_name,
        )
        answers.append(_answer(result))
    assert cache.admit(query) is admitted  # kept, with its validation
    assert admitted.validation_errors is not None
    assert answers == [expected] * 3


def test_refused_and_unparsable_documents_are_refused_every_time() -> None:
    cache = DocumentCache(size=8, max_tokens=100, max_depth=3, max_aliases=1)
    deep = "{ a { b { c { d } } } }"
    aliased = "{ x: me { user } y: me { user } }"
    long = "{ " + "me { user } " * 40 + "}"
    for query, message in [
        (deep, "deeper than 3"),
        (aliased, "more than 1 aliases"),
        (long, "more than 100 tokens"),
    ]:
        for _ in range(2):
            with pytest.raises(Exception, match=message):
                cache.admit(query)
    assert cache.admit("{ me { ") is None  # execution reports the syntax error
    assert cache.admit("{ me { user } }") is cache.admit("{ me { user } }")
    padded = "{ me { user } }" + " " * MAX_KEPT_QUERY_CHARS  # admitted, too long to keep
    assert cache.admit(padded) is not cache.admit(padded)
    uncached = DocumentCache(size=0, max_tokens=100, max_depth=3, max_aliases=1)
    assert uncached.admit("{ me { user } }") is not uncached.admit("{ me { user } }")


async def _post(client: httpx.AsyncClient, query: str, variables: Any = None) -> httpx.Response:
    return await client.post("/graphql", json={"query": query, "variables": variables})


async def test_a_kept_document_still_gets_every_per_request_check(
    sqlite_local_stack: Stack,
) -> None:
    """Cost from variables, list lengths and text of variables, authentication: none of them
    is kept with the document."""
    stack = sqlite_local_stack
    query = "query($n: Int) { annotations(limit: $n) { maskGroups { masks { id } } } }"
    assert (await _post(stack.client, query, {"n": 1})).status_code == 200  # now kept
    with count_statements(stack.services.engine) as statements:
        expensive = await _post(stack.client, query, {"n": 100_000})
        nul = await _post(stack.client, query, {"n": 1, "s": "a\x00"})
    assert expensive.status_code == 400
    assert "above the limit" in expensive.json()["errors"][0]["message"]
    assert nul.status_code == 400
    assert "NUL" in nul.json()["errors"][0]["message"]
    assert statements == []
    async with httpx.AsyncClient(base_url=stack.base_url) as anonymous:
        refused = await _post(anonymous, query, {"n": 1})
    assert refused.status_code == 401
    batch = "query($ids: [ID!]) { me { user } }"
    assert (await _post(stack.client, batch, {"ids": ["1"]})).status_code == 200
    too_many = await _post(stack.client, batch, {"ids": ["1"] * 6000})
    assert too_many.status_code == 400
    assert "MAX_SLICES_PER_CALL" in too_many.json()["errors"][0]["message"]


async def test_answers_are_the_same_with_and_without_the_cache(
    sqlite_local_stack: Stack,
) -> None:
    """The README's tree query and refused documents, over HTTP, twice each on a server that
    keeps documents and on one that keeps none."""
    stack = sqlite_local_stack
    documents = [
        (readme_tree_query(), {"id": "999999"}),
        (readme_tree_query(), {"id": ["not", "an", "id"]}),
        ("{ me { user nosuch } }", None),
        ("{ me { user ", None),
        ("{ " + " ".join(f"a{i}: me {{ user }}" for i in range(60)) + " }", None),
    ]
    settings = stack.settings.model_copy(update={"graphql_document_cache_size": 0})
    async with (
        serve(settings) as (_, base_url),
        httpx.AsyncClient(base_url=base_url, headers=stack.auth()) as uncached,
    ):
        for query, variables in documents:
            answers = set()
            for client in (stack.client, stack.client, uncached, uncached):
                response = await _post(client, query, variables)
                answers.add((response.status_code, response.text))
            assert len(answers) == 1, answers


# --- API tokens ------------------------------------------------------------------------------


async def _new_token(stack: Stack, expires_in: timedelta | None = None) -> tuple[int, str]:
    actor = Actor(Principal("test-setup", Role.ADMIN))
    async with transaction(stack.sessionmaker) as session:
        token, secret = await create_token(
            session, actor, user="viewer-9", role=Role.READER, expires_in=expires_in, now=utcnow()
        )
    return token.id, secret


async def _revoke(stack: Stack, token_id: int) -> None:
    async with transaction(stack.sessionmaker) as session:
        await revoke_token(session, Actor(Principal("test", Role.ADMIN)), token_id, utcnow())


async def test_a_revoked_token_stops_working_within_the_cache_lifetime(
    sqlite_local_stack: Stack,
) -> None:
    stack = sqlite_local_stack
    token_id, secret = await _new_token(stack)
    cache = TokenCache(seconds=5)
    now = utcnow()
    viewer = Principal("viewer-9", Role.READER)

    async def caller(at: timedelta, tokens: TokenCache | None = cache) -> Principal:
        return await authenticate(
            stack.sessionmaker, secret, oidc=None, now=now + at, tokens=tokens
        )

    assert await caller(timedelta(0)) == viewer
    await _revoke(stack, token_id)
    # The standard path refuses at once; the kept lookup is reused for at most 5 s.
    with pytest.raises(Unauthenticated):
        await caller(timedelta(0), None)
    with pytest.raises(Unauthenticated):
        await caller(timedelta(0), TokenCache(seconds=0))
    assert await caller(timedelta(seconds=4.9)) == viewer
    with pytest.raises(Unauthenticated):
        await caller(timedelta(seconds=5))
    with pytest.raises(Unauthenticated):  # refusals are not kept either
        await caller(timedelta(seconds=5.1))


async def test_a_kept_token_is_never_used_past_its_expiry(sqlite_local_stack: Stack) -> None:
    stack = sqlite_local_stack
    _, secret = await _new_token(stack, expires_in=timedelta(seconds=2))
    cache = TokenCache(seconds=60)
    now = utcnow()
    principal = await authenticate(stack.sessionmaker, secret, oidc=None, now=now, tokens=cache)
    assert principal.user == "viewer-9"
    with pytest.raises(Unauthenticated):
        await authenticate(
            stack.sessionmaker, secret, oidc=None, now=now + timedelta(seconds=3), tokens=cache
        )


async def test_a_served_revocation_takes_effect_on_the_next_request_without_the_cache(
    tmp_path: Any, own_sqlite_url: str
) -> None:
    settings = base_settings(
        database_url=own_sqlite_url,
        var_dir=tmp_path,
        storage_provider="local",
        token_cache_seconds=0,
    )
    async with serve(settings) as (services, base_url):
        actor = Actor(Principal("test-setup", Role.ADMIN))
        async with transaction(services.sessionmaker) as session:
            token, secret = await create_token(
                session, actor, user="viewer-9", role=Role.READER, expires_in=None, now=utcnow()
            )
        headers = {"Authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
            assert (await _post(client, "{ me { user } }")).status_code == 200
            async with transaction(services.sessionmaker) as session:
                await revoke_token(session, actor, token.id, utcnow())
            assert (await _post(client, "{ me { user } }")).status_code == 401
