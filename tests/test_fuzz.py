"""A bounded fuzz run: operations generated from schema.graphql (hypothesis-graphql), valid and
with one schema violation each, sent over HTTP to a real server with an ADMIN token. Whatever
they ask, the answer is never a 5xx and never INTERNAL_SERVER_ERROR.

Deterministic (derandomized, no example database); 500 operations take about a minute. It runs on PostgreSQL, the stricter database."""

from __future__ import annotations

import asyncio
import string
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import graphql
import httpx
import pytest
from conftest import POSTGRES_ADMIN_URL, Stack, base_settings, open_stack
from flows import create_annotation, create_group, upload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_graphql import Mode, from_schema, nodes

from app.db import upgrade_database

SCHEMA = (Path(__file__).parent.parent / "schema.graphql").read_text()
OPERATIONS = 500


def _json_node(value: Any) -> graphql.ValueNode:
    if isinstance(value, dict):
        return nodes.Object(
            [
                graphql.ObjectFieldNode(name=graphql.NameNode(value=key), value=_json_node(item))
                for key, item in value.items()
            ]
        )
    if isinstance(value, list):
        return nodes.List([_json_node(item) for item in value])
    if isinstance(value, bool):
        return nodes.Boolean(value)
    if isinstance(value, int):
        return nodes.Int(value)
    if isinstance(value, float):
        return nodes.Float(value)
    if value is None:
        return nodes.Null
    return nodes.String(value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.from_regex(r"\A[a-z][A-Za-z0-9_]{0,6}\Z"), children, max_size=3)
    ),
    max_leaves=10,
)
# Mostly ids that exist (the seeded objects), sometimes anything.
_ids = st.integers(0, 8).map(str) | st.text(string.digits, min_size=1, max_size=25) | st.text()
# Text with a NUL now and then: PostgreSQL refuses it in text columns and comparisons.
_strings = st.text(max_size=12) | st.sampled_from(["\x00", "a\x00b", "1.2\x00"])
SCALARS = {
    "String": _strings.map(nodes.String),
    "ID": _ids.map(nodes.String),
    "BigInt": (st.integers(-5, 200) | st.integers()).map(nodes.Int),
    "JSON": _json.map(_json_node),
    "DateTime": st.datetimes().map(lambda moment: nodes.String(moment.isoformat())),
}


def operations() -> st.SearchStrategy[str]:
    strategies = [
        from_schema(SCHEMA, custom_scalars=SCALARS, mode=mode) for mode in Mode
    ]  # queries and mutations alike
    return st.one_of(*strategies).map(str)


@pytest.fixture
async def own_postgres_url(postgres_url: str) -> AsyncIterator[str]:
    """A PostgreSQL database of this test's own (the stricter database: 32-bit ids, no NUL
    in text, no NaN in json), so that what the fuzz run writes stays there."""
    admin = POSTGRES_ADMIN_URL
    name = f"pacs_masks_fuzz_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(admin)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    await asyncio.to_thread(upgrade_database, url)
    yield url
    connection = await asyncpg.connect(admin)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture
async def fuzz_stack(tmp_path: Path, own_postgres_url: str) -> AsyncIterator[Stack]:
    settings = base_settings(database_url=own_postgres_url, var_dir=tmp_path)
    async with open_stack("fuzz", settings) as stack:
        for _ in range(2):
            annotation_id = await create_annotation(stack)
            for slice_count in (1, 3):
                group_id = await create_group(stack, annotation_id, slice_count)
                await upload(stack, group_id, range(slice_count))
        yield stack


# hypothesis-graphql draws some names with the `random` module inside its strategies, which
# Hypothesis flags with a deprecation warning; that is the library's code, not ours.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_generated_operations_never_fail_inside(fuzz_stack: Stack) -> None:
    stack = fuzz_stack
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    async def send(query: str) -> httpx.Response:
        return await stack.client.post(
            "/graphql", json={"query": query}, headers=stack.auth("admin")
        )

    @settings(
        max_examples=OPERATIONS,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(query=operations())
    def run(query: str) -> None:
        seen.append(query)
        response = asyncio.run_coroutine_threadsafe(send(query), loop).result()
        assert response.status_code < 500, (query, response.text)
        body = response.json()
        codes = [error.get("extensions", {}).get("code") for error in body.get("errors", [])]
        assert "INTERNAL_SERVER_ERROR" not in codes, (query, body)

    await asyncio.to_thread(run)
    assert len(seen) >= 500
    assert any(query.lstrip().startswith("mutation") for query in seen)
