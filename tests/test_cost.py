"""Calculated query cost: refused before authentication and before the database, fragments
counted per spread, the viewer's real queries allowed."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Stack, base_settings, count_statements, serve
from graphql import build_schema
from operations import COMPLETE, REQUEST_URLS, TREE
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from app.graphql.cost import QueryCost

README = Path(__file__).parent.parent / "README.md"
BENCH = Path(__file__).parent.parent / "bench" / "harness.py"


def readme_tree_query() -> str:
    text = README.read_text()
    # Step 6 of the upload sequence: the query inside its jq command.
    return re.search(r'query: "(query\(\$id: ID!\) \{ annotation.*?)",\n', text).group(1)  # type: ignore[union-attr]


def bench_tree_query() -> str:
    return re.search(r'TREE = """(.*?)"""', BENCH.read_text(), re.DOTALL).group(1)  # type: ignore[union-attr]


def nested_groups(levels: int) -> str:
    """maskGroups ↔ annotation, within the depth limit: work grows tenfold per level."""
    query = "id"
    for _ in range(levels):
        query = f"maskGroups {{ annotation {{ {query} }} }}"
    return f'{{ annotation(id: "1") {{ {query} }} }}'


async def post(client: httpx.AsyncClient, query: str, **extra: Any) -> httpx.Response:
    return await client.post("/graphql", json={"query": query, **extra})


@pytest.fixture
async def anonymous(sqlite_local_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sqlite_local_stack.base_url) as client:
        yield client


async def test_exponential_query_is_refused_before_authentication_and_the_database(
    sqlite_local_stack: Stack, anonymous: httpx.AsyncClient
) -> None:
    stack = sqlite_local_stack
    query = nested_groups(6)  # depth 14: within the depth limit, 10^6 groups
    with count_statements(stack.services.engine) as statements:
        for client in (stack.client, anonymous):  # with a token and without
            response = await post(client, query)
            assert response.status_code == 400
            error = response.json()["errors"][0]
            assert error["extensions"] == {
                "code": "BAD_USER_INPUT",
                "cost": 2_222_222,
                "maxCost": 200_000,
            }
            assert "MAX_QUERY_COST" in error["message"]
    assert statements == []


async def test_the_viewers_queries_stay_allowed(stack: Stack) -> None:
    # The cost depends on the document only: an empty database shows the verdict.
    for query in (readme_tree_query(), TREE, bench_tree_query()):
        assert await stack.data(query, {"id": "1"}, as_="reader") == {"annotation": None}
    # The largest batches, executed (NOT_FOUND: no such group), not refused for their cost.
    urls = [{"sliceIndex": index, "fileSize": 1, "contentMd5": "x"} for index in range(5000)]
    completed = [{"sliceIndex": index} for index in range(5000)]
    for mutation, slices in ((REQUEST_URLS, urls), (COMPLETE, completed)):
        error = await stack.error(mutation, {"groupId": "1", "slices": slices})
        assert error["extensions"]["code"] == "NOT_FOUND"


async def test_fragments_are_counted_per_spread(sqlite_local_stack: Stack) -> None:
    stack = sqlite_local_stack
    # F costs 10 groups x 1000 masks; G0 spreads it 2^5 = 32 times through doubling fragments.
    doubling = " ".join(
        f"fragment G{level} on Annotation {{ ...G{level + 1} ...G{level + 1} }}"
        for level in range(5)
    )
    query = (
        '{ annotation(id: "1") { ...G0 } } '
        + doubling.replace("...G5", "...F")
        + " fragment F on Annotation { maskGroups { masks { id } } }"
    )
    response = await post(stack.client, query)
    assert response.status_code == 400
    assert response.json()["errors"][0]["extensions"]["cost"] == 1 + 32 * (1 + 10 * 1001)
    # Spread 8 times it is allowed.
    allowed = query.replace("...G0 }", "...G2 }", 1)
    assert (await post(stack.client, allowed)).status_code == 200


async def test_aliases_are_counted_per_spread(sqlite_local_stack: Stack) -> None:
    stack = sqlite_local_stack
    # 3 aliases in one fragment, spread 2^5 = 32 times: 96 aliases, cost only ~200.
    doubling = " ".join(
        f"fragment A{level} on Query {{ ...A{level + 1} ...A{level + 1} }}" for level in range(5)
    )
    leaf = "fragment A5 on Query { a: me { user } b: me { user } c: me { user } }"
    response = await post(stack.client, f"{{ ...A0 }} {doubling} {leaf}")
    assert response.status_code == 400
    assert "more than 50 aliases" in response.json()["errors"][0]["message"]
    fewer = f"{{ ...A2 }} {doubling} {leaf}"  # 8 spreads: 24 aliases
    assert (await post(stack.client, fewer)).status_code == 200


async def test_exponentially_spreading_fragments_are_measured_in_linear_time(
    sqlite_local_stack: Stack,
) -> None:
    # 2^60 expansions: counted one by one, neither the limits nor the cost would finish.
    doubling = " ".join(
        f"fragment E{level} on Annotation {{ ...E{level + 1} ...E{level + 1} }}"
        for level in range(60)
    )
    query = f'{{ annotation(id: "1") {{ ...E0 }} }} {doubling} fragment E60 on Annotation {{ id }}'
    response = await post(sqlite_local_stack.client, query)
    assert response.status_code == 400
    assert response.json()["errors"][0]["extensions"]["cost"] > 200_000


async def test_long_chains_of_fragments_are_refused(sqlite_local_stack: Stack) -> None:
    # Each walk over a spread chain recurses: 1000 links would exhaust the stack (a 500).
    chain = " ".join(f"fragment C{link} on Query {{ ...C{link + 1} }}" for link in range(1000))
    response = await post(
        sqlite_local_stack.client,
        f"{{ ...C0 }} {chain} fragment C1000 on Query {{ me {{ user }} }}",
    )
    assert response.status_code == 400
    assert "more than 100 levels" in response.json()["errors"][0]["message"]
    short = " ".join(f"fragment C{link} on Query {{ ...C{link + 1} }}" for link in range(20))
    allowed = f"{{ ...C0 }} {short} fragment C20 on Query {{ me {{ user }} }}"
    assert (await post(sqlite_local_stack.client, allowed)).json()["data"]["me"]["user"]


async def test_list_bounds_limit_and_slice_ranges(tmp_path: Path, own_sqlite_url: str) -> None:
    settings = base_settings(
        database_url=own_sqlite_url, var_dir=tmp_path, auth_disabled=True, max_query_cost=100
    )
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("{ annotations { id } }", {}, 1 + 50),  # limit's default
        ("{ annotations(limit: 99) { id } }", {}, 1 + 99),
        ("{ annotations(limit: 200) { id } }", {}, 1 + 200),
        ("query($n: Int!) { annotations(limit: $n) { id } }", {"n": 120}, 1 + 120),
        ('{ maskGroup(id: "1") { masks { id } } }', {}, 1 + 1 + 1000),
        ('{ maskGroup(id: "1") { masks(sliceIndexFrom: 5, sliceIndexTo: 14) { id } } }', {}, 12),
        ('{ maskGroup(id: "1") { masks(limit: 97) { id } } }', {}, 1 + 1 + 97),
        ('{ maskGroup(id: "1") { masks(sliceIndexFrom: 0, sliceIndexTo: 99) { id } } }', {}, 102),
        ('{ annotation(id: "1") { maskGroups { id missingSliceIndexes } } }', {}, 1 + 1 + 10 * 2),
    ]
    async with serve(settings) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        for query, variables, cost in cases:
            response = await post(client, query, variables=variables)
            if cost <= 100:
                assert response.status_code == 200, (query, response.text)
                assert "errors" not in response.json(), query
            else:
                assert response.status_code == 400, query
                extensions = response.json()["errors"][0]["extensions"]
                assert extensions == {"code": "BAD_USER_INPUT", "cost": cost, "maxCost": 100}


def test_every_list_of_objects_needs_a_bound() -> None:
    schema = build_schema("type Query { things: [Thing!]! ids: [ID!]! } type Thing { id: ID }")
    with pytest.raises(ValueError, match=r"Query\.things"):
        QueryCost(schema, max_slices_per_call=5000)


async def test_subscriptions_are_admitted_by_the_same_checks(
    tmp_path: Path, own_sqlite_url: str
) -> None:
    settings = base_settings(
        database_url=own_sqlite_url, var_dir=tmp_path, auth_disabled=True, max_query_cost=2
    )
    events = "subscription($id: ID!) { maskGroupEvents(annotationId: $id) { kind status } }"
    async with serve(settings) as (_, base_url):
        url = base_url.replace("http://", "ws://", 1) + "/graphql"
        async with connect(url, subprotocols=[Subprotocol("graphql-transport-ws")]) as socket:
            await socket.send(json.dumps({"type": "connection_init", "payload": {}}))
            assert json.loads(await socket.recv()) == {"type": "connection_ack"}
            for operation_id, variables, message in [
                ("cost", {"id": "1"}, "above the limit of 2"),
                ("nul", {"id": "1\x00"}, "NUL"),
            ]:
                payload = {"query": events, "variables": variables}
                await socket.send(
                    json.dumps({"id": operation_id, "type": "subscribe", "payload": payload})
                )
                refused = json.loads(await asyncio.wait_for(socket.recv(), 10))
                assert refused["id"] == operation_id
                assert refused["type"] == "error"
                assert refused["payload"][0]["extensions"]["code"] == "BAD_USER_INPUT"
                assert message in refused["payload"][0]["message"]
