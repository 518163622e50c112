"""The fast paths return exactly what the standard paths return: the fast list completion
against graphql-core's standard executor, masks loaded for their selection only against
masks loaded whole, the response encoder against the standard library's."""

from __future__ import annotations

import gc
import json
import re
from datetime import datetime, timedelta
from typing import Any, ClassVar

import pytest
from conftest import Stack
from flows import create_annotation, create_group, upload
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

from app.audit import Actor
from app.graphql import encoded, loaders
from app.graphql.collector import collector_paused
from app.graphql.context import Context
from app.graphql.encoded import encode_list
from app.graphql.execution import FastListExecutionContext
from app.graphql.schema import create_schema
from app.graphql.selections import needed_columns
from app.graphql.types import MASK_RESOLVER_COLUMNS, mask_columns
from app.graphql.view import _encode
from app.principals import Principal, Role

QUERIES = [
    """query($id: ID!) { annotation(id: $id) { maskGroups { masks {
        id maskGroupId sliceIndex sopInstanceUid labelName filePath mimeType fileSize checksum
        width height createdAt viewUrl __typename } } } }""",
    """query($id: ID!) { annotation(id: $id) { maskGroups { masks { ...M first: sliceIndex
        label: labelName @include(if: true) skipped: id @skip(if: true) } } } }
       fragment M on Mask { filePath fileSize }""",
    """query($id: ID!) { annotation(id: $id) { maskGroups { masks(limit: 2) {
        sliceIndex downloadUrl(ttlSeconds: 60) { method headers { name } } } } } }""",
    """query($id: ID!) { annotation(id: $id) { maskGroups { masks(labelName: "none") { id } } } }""",
    """query($id: ID!) { annotation(id: $id) { maskGroups { masks(offset: 1, limit: 2) {
        __typename ... on Mask { viewUrl ...S } } } } }
       fragment S on Mask { sliceIndex labelName width }""",
    # One loader key twice in a batch: each list is built from rows of its own.
    """query($id: ID!) { annotation(id: $id) { maskGroups { a: masks { id viewUrl }
        b: masks { viewUrl id } } } }""",
]


@pytest.mark.parametrize(
    "query",
    QUERIES,
    ids=["plain", "aliases-fragments", "arguments", "empty", "inline-paged", "same-list-twice"],
)
@pytest.mark.parametrize("stream_rows", [2, 5000], ids=["streamed", "one-round-trip"])
async def test_fast_path_matches_standard_execution(
    stack: Stack, query: str, stream_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small chunks and stream partitions, so that lists and groups straddle their boundaries;
    # or all rows in the first round trip, which is not streamed.
    monkeypatch.setattr(encoded, "CHUNK_ITEMS", 3)
    monkeypatch.setattr(loaders, "STREAM_ROWS", stream_rows)
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 3)
    await upload(stack, group_id, range(3))
    await upload(stack, group_id, [1], label="tumor")
    await create_group(stack, annotation_id, 2)  # no mask yet
    other_id = await create_group(stack, annotation_id, 3)
    await upload(stack, other_id, [0, 2])
    variables = {"id": annotation_id}
    response = await stack.client.post(
        "/graphql", json={"query": query, "variables": variables}, headers=stack.auth()
    )
    assert response.status_code == 200

    standard = create_schema(execution_context_class=StrawberryGraphQLCoreExecutionContext)
    result = await standard.execute(query, variable_values=variables, context_value=_context(stack))
    assert result.errors is None
    # The same bytes as the standard path's data written by the standard library's encoder;
    # signed view URLs differ only if the two runs straddle an expiry step.
    slow = json.dumps({"data": result.data}, separators=(",", ":"), ensure_ascii=False)
    assert _same_expiry(response.content.decode()) == _same_expiry(slow)
    fast = response.json()["data"]
    groups = fast["annotation"]["maskGroups"]
    assert len(groups) == 3
    if "a" in groups[0]:
        assert [len(group["a"]) for group in groups] == [len(group["b"]) for group in groups]
        assert [len(group["a"]) for group in groups] == [4, 0, 2]


def _context(stack: Stack) -> Context:
    return Context(
        settings=stack.settings,
        sessionmaker=stack.sessionmaker,
        storage=stack.storage,
        jobs=stack.services.jobs,
        actor=Actor(Principal("reader-1", Role.READER), request_id="test"),
        events=stack.services.events,
        view_urls=stack.services.view_urls,
    )


def _same_expiry(data: Any) -> str:
    text = data if isinstance(data, str) else json.dumps(data, default=encoded.as_python)
    return re.sub(r"expires=\d+&signature=[\w-]+", "expires=E&signature=S", text)


def _same_signing_time(data: Any) -> str:
    """Two runs sign at different times: what the time makes (S3's X-Amz-Date and signature,
    local storage's expiry and signature, expiresAt) is set aside; the TTLs are kept."""
    text = _same_expiry(data)
    text = re.sub(r"X-Amz-Date=\w+", "X-Amz-Date=D", text)
    text = re.sub(r"X-Amz-Signature=\w+", "X-Amz-Signature=S", text)
    return re.sub(r'"expiresAt": "[^"]+"', '"expiresAt": "T"', text)


class RecordingContext(FastListExecutionContext):
    """The fast execution context, noting which item types' lists had a plan."""

    planned: ClassVar[set[tuple[str, bool]]] = set()

    def _plain_plan(self, item_type: Any, field_details_list: Any) -> Any:
        plan = super()._plain_plan(item_type, field_details_list)
        RecordingContext.planned.add((item_type.name, plan is not None))
        return plan


TREE = """annotation(id: $id) { maskGroups { masks(sliceIndexFrom: 0, sliceIndexTo: 500) {"""
README_TREE = """query($id: ID!) { annotation(id: $id) { id studyInstanceUid maskGroups { id
    modelName status uploadedSliceCount missingSliceIndexes masks(sliceIndexFrom: 0,
    sliceIndexTo: 500) { sliceIndex labelName fileSize checksum viewUrl
    downloadUrl(ttlSeconds: 300) { url expiresAt } } } } }"""
TWO_TTLS = f"""query($id: ID!) {{ {TREE} sliceIndex short: downloadUrl(ttlSeconds: 60) {{
    url expiresAt }} long: downloadUrl {{ url method headers {{ name value }} expiresAt }}
    again: downloadUrl(ttlSeconds: 60) {{ expiresAt }} }} }} }} }}"""
BY_VARIABLE = f"""query($id: ID!, $ttl: Int) {{ {TREE} id ...D }} }} }} }}
    fragment D on Mask {{ downloadUrl(ttlSeconds: $ttl) {{ url expiresAt __typename }} }}"""
OUT_OF_RANGE = f"""query($id: ID!) {{ {TREE} sliceIndex downloadUrl(ttlSeconds: 0) {{ url }} }}
    }} }} }}"""
# (query, variables besides the id, whether the masks take the fast path)
DOWNLOAD_URL_QUERIES = {
    "readme": (README_TREE, {}, True),
    "two-ttls": (TWO_TTLS, {}, True),
    "variable": (BY_VARIABLE, {"ttl": 120}, True),
    "variable-null": (BY_VARIABLE, {"ttl": None}, True),
    "variable-absent": (BY_VARIABLE, {}, True),
    "out-of-range": (OUT_OF_RANGE, {}, False),
    "variable-out-of-range": (BY_VARIABLE, {"ttl": 10**9}, False),
}


@pytest.mark.parametrize("name", list(DOWNLOAD_URL_QUERIES))
async def test_download_urls_by_arguments_match_standard_execution(stack: Stack, name: str) -> None:
    query, extra, fast_path = DOWNLOAD_URL_QUERIES[name]
    annotation_id = await create_annotation(stack)
    for _ in range(2):
        group_id = await create_group(stack, annotation_id, 3)
        await upload(stack, group_id, range(3))
        await upload(stack, group_id, [1], label="tumor")
    variables = {"id": annotation_id, **extra}
    results = []
    RecordingContext.planned = set()
    for context_class in (RecordingContext, StrawberryGraphQLCoreExecutionContext):
        schema = create_schema(execution_context_class=context_class)
        result = await schema.execute(
            query, variable_values=variables, context_value=_context(stack)
        )
        errors = [error.formatted for error in result.errors or []]
        results.append((_same_signing_time(result.data), json.dumps(errors)))
    assert results[0] == results[1]
    assert ("Mask", fast_path) in RecordingContext.planned
    assert ("Mask", not fast_path) not in RecordingContext.planned
    served = await stack.gql(query, variables)
    if fast_path:
        assert _same_signing_time(served["data"]) == results[1][0]
        masks = [m for g in served["data"]["annotation"]["maskGroups"] for m in g["masks"]]
        assert len(masks) == 8
    else:
        assert {e["extensions"]["code"] for e in served["errors"]} == {"BAD_USER_INPUT"}
        assert json.loads(results[0][1])[0]["message"].startswith("ttlSeconds must be")
    if name == "two-ttls":
        # A list's URLs share one signing time, whichever path signs them, rounded down to
        # each TTL's step (app.storage.signing_time: 6 s for 60, 60 s for 600).
        default_ttl = stack.settings.signed_url_default_ttl
        for mask in masks:
            short = datetime.fromisoformat(mask["short"]["expiresAt"]) - timedelta(seconds=60)
            long = datetime.fromisoformat(mask["long"]["expiresAt"]) - timedelta(
                seconds=default_ttl
            )
            assert short.timestamp() % 6 == 0
            assert long.timestamp() % min(60, default_ttl // 10) == 0
            assert long <= short < long + timedelta(seconds=min(60, default_ttl // 10))
            assert mask["again"]["expiresAt"] == mask["short"]["expiresAt"]


# Every field of Mask, so the masks are loaded with every column (plus a field selected twice).
EVERY_FIELD = """query($id: ID!) { annotation(id: $id) { maskGroups { masks(limit: 10) {
    id maskGroupId sliceIndex sopInstanceUid labelName filePath mimeType fileSize checksum
    width height confidence createdAt viewUrl again: sliceIndex
    downloadUrl { method headers { name } } } } } }"""


async def test_masks_loaded_for_one_field_match_masks_loaded_whole(stack: Stack) -> None:
    """Each field alone loads only its columns; its values are those of the whole rows."""
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    await upload(stack, group_id, range(2))
    await upload(stack, group_id, [0], label="tumor-1")
    variables = {"id": annotation_id}
    (whole,) = (await stack.data(EVERY_FIELD, variables))["annotation"]["maskGroups"]
    assert len(whole["masks"]) == 3
    names = set(mask_columns())
    assert names >= {"viewUrl", "downloadUrl", "createdAt", "sopInstanceUid"}
    for name in sorted(names):
        # The whole rows come paged, each field alone unpaged: both statements are compared.
        masks = "masks"
        selection = name
        if name == "downloadUrl":  # within the query cost limit
            masks, selection = "masks(limit: 10)", "downloadUrl { method headers { name } }"
        query = f"query($id: ID!) {{ annotation(id: $id) {{ maskGroups {{ {masks} {{ {selection} }} }} }} }}"
        (alone,) = (await stack.data(query, variables))["annotation"]["maskGroups"]
        expected = [{name: mask[name]} for mask in whole["masks"]]
        assert _same_expiry(alone["masks"]) == _same_expiry(expected), name


def test_an_unmapped_field_loads_every_column() -> None:
    columns = mask_columns()
    assert needed_columns(["viewUrl", "__typename"], columns) == (
        "label_name",
        "mask_group_id",
        "slice_index",
    )
    # A resolver field whose columns are not declared: the whole row, whatever it reads.
    assert needed_columns(["sliceIndex", "someNewResolver"], columns) is None
    assert set(MASK_RESOLVER_COLUMNS) == {"view_url", "download_url"}


ENCODED = [
    {"text": 'ünï ✓ \u2028 "q" \\', "ratio": 0.1, "n": [1, -2, 2**62], "none": None, "t": True},
    # orjson refuses integers past 64 bits: the standard encoder writes those answers.
    {"big": 2**70, "negative": -(2**65), "text": "ünï"},
]


@pytest.mark.parametrize("parameters", ENCODED, ids=["orjson", "fallback"])
async def test_responses_encode_as_the_standard_encoder_did(
    stack: Stack, parameters: dict[str, Any]
) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 1, inferenceParameters=parameters)
    query = "query($id: ID!) { maskGroup(id: $id) { inferenceParameters } }"
    response = await stack.client.post(
        "/graphql", json={"query": query, "variables": {"id": group_id}}, headers=stack.auth()
    )
    assert response.status_code == 200
    expected = {"data": {"maskGroup": {"inferenceParameters": parameters}}}
    assert (
        response.content == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()
    )


ITEMS = [
    {"text": 'ünï ✓ \u2028 "q" \\', "ratio": 0.1, "big": 1e16, "n": index, "none": None}
    for index in range(7)
]


@pytest.mark.parametrize("extra", [2**62, 2**70], ids=["orjson", "fallback"])
def test_encoded_lists_encode_as_the_lists_they_were_built_from(
    extra: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lists completed to JSON bytes (in chunks) give the response the bytes the lists would
    have given, through orjson and through the standard encoder alike."""
    monkeypatch.setattr(encoded, "CHUNK_ITEMS", 3)
    encoded_list = encode_list(ITEMS, dict)
    assert encoded_list is not None
    plain = {"data": {"a": ITEMS, "nested": [{"b": ITEMS}], "extra": extra}}
    spliced = {"data": {"a": encoded_list, "nested": [{"b": encoded_list}], "extra": extra}}
    assert _encode(spliced) == _encode(plain)
    if extra > 2**64:
        assert (
            _encode(plain) == json.dumps(plain, separators=(",", ":"), ensure_ascii=False).encode()
        )


def test_a_list_orjson_refuses_is_left_to_python_values() -> None:
    assert encode_list([{"n": 1}, {"n": 2**70}], dict) is None


def test_collector_pauses_nest_and_restore_its_state() -> None:
    assert gc.isenabled()
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
