"""GraphQL hardening: structural limits refused before any database work, switches, headers."""

from __future__ import annotations

from pathlib import Path

import httpx
from conftest import Stack, base_settings, count_statements, serve


def _deep_query(levels: int) -> str:
    query = "id"
    for _ in range(levels):
        query = f"maskGroups {{ annotation {{ {query} }} }}"
    return f'{{ annotation(id: "1") {{ {query} }} }}'


async def _post(stack: Stack, query: str, **headers: str) -> httpx.Response:
    return await stack.client.post("/graphql", json={"query": query}, headers=headers)


async def test_a_30_level_query_is_refused_without_the_database(sqlite_local_stack: Stack) -> None:
    stack = sqlite_local_stack
    with count_statements(stack.services.engine) as statements:
        response = await _post(stack, _deep_query(15))  # 31 levels
    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert "deeper than 15" in error["message"]
    assert statements == []
    assert (await _post(stack, _deep_query(4))).status_code == 200  # 9 levels, cost 22,222


async def test_2000_aliases_are_refused_without_the_database(sqlite_local_stack: Stack) -> None:
    stack = sqlite_local_stack
    query = "{ " + " ".join(f"a{i}: me {{ user }}" for i in range(2000)) + " }"
    with count_statements(stack.services.engine) as statements:
        response = await _post(stack, query)
    assert response.status_code == 400
    assert "more than 50 aliases" in response.json()["errors"][0]["message"]
    assert statements == []
    fine = await _post(stack, "{ " + " ".join(f"a{i}: me {{ user }}" for i in range(50)) + " }")
    assert fine.status_code == 200


async def test_token_and_size_limits(sqlite_local_stack: Stack) -> None:
    stack = sqlite_local_stack
    many_tokens = "{ me { " + "user " * 25_000 + "} }"
    response = await _post(stack, many_tokens)
    assert response.status_code == 400
    assert "tokens" in response.json()["errors"][0]["message"]
    huge = await stack.client.post(
        "/graphql",
        content=b'{"query": "' + b" " * (17 * 1024 * 1024) + b'{ me { user } }"}',
        headers={"Content-Type": "application/json"},
    )
    assert huge.status_code == 413


async def test_fragment_depth_counts_and_cycles_do_not_hang(sqlite_local_stack: Stack) -> None:
    stack = sqlite_local_stack
    spread = "fragment F on MaskGroup { annotation { maskGroups { ...F } } }"
    response = await _post(stack, '{ annotation(id: "1") { maskGroups { ...F } } } ' + spread)
    assert response.status_code == 200
    assert response.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_introspection_and_graphiql_can_be_switched_off(
    tmp_path: Path, own_sqlite_url: str
) -> None:
    introspection = "{ __schema { queryType { name } } }"
    settings = base_settings(
        database_url=own_sqlite_url,
        var_dir=tmp_path,
        graphql_introspection=False,
        graphiql=False,
        auth_disabled=True,
    )
    async with serve(settings) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        refused = await client.post("/graphql", json={"query": introspection})
        page = await client.get("/graphql", headers={"Accept": "text/html"})
    assert refused.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert "data" not in refused.json() or refused.json()["data"] is None
    assert page.status_code == 404

    settings = settings.model_copy(update={"graphql_introspection": True, "graphiql": True})
    async with serve(settings) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        allowed = await client.post("/graphql", json={"query": introspection})
        page = await client.get("/graphql", headers={"Accept": "text/html"})
    assert allowed.json()["data"]["__schema"]["queryType"]["name"] == "Query"
    assert page.status_code == 200
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


async def test_security_headers_on_every_response(sqlite_local_stack: Stack) -> None:
    response = await _post(sqlite_local_stack, "{ me { user } }")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
