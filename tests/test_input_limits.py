"""Huge inputs are refused before they cost anything: list variables before graphql-core
coerces them (and before the role check), request bodies sized to the largest legitimate
batch, free JSON inputs bounded."""

from __future__ import annotations

import json
from typing import Any

import httpx
from conftest import Stack, base_settings, count_statements
from flows import create_annotation
from operations import COMPLETE, CREATE_GROUP, REQUEST_URLS
from sqlalchemy import func, select

from app.models import AuditEvent, MaskGroup

DEFAULTS = base_settings()


def largest_batch(mutation: str, item: dict[str, Any], indent: int | None) -> bytes:
    variables = {"groupId": "2147483647", "slices": [item] * 5000, "ttl": 3600}
    return json.dumps({"query": mutation, "variables": variables}, indent=indent).encode()


# The longest value every field of the batch inputs accepts.
LONGEST_UPLOAD = {
    "sliceIndex": 99_999,
    "labelName": "L" * 64,
    "contentType": "application/octet-stream",
    "fileSize": 67_108_864,
    "contentMd5": "4/ukI2WU1u7QvYjGm7ZmRA==",
}
LONGEST_COMPLETION = {
    "sliceIndex": 99_999,
    "labelName": "L" * 64,
    "sopInstanceUid": "1." + "2" * 62,
    "width": 65_535,
    "height": 65_535,
}


async def test_long_list_variables_are_refused_before_coercion_and_the_role_check(
    sqlite_local_stack: Stack,
) -> None:
    stack = sqlite_local_stack
    slices = [{"sliceIndex": index, "width": 1, "height": 1} for index in range(5001)]
    body = {"query": COMPLETE, "variables": {"groupId": "1", "slices": slices}}
    with count_statements(stack.services.engine) as statements:
        for headers in (stack.auth("reader"), {"Authorization": ""}):
            response = await stack.client.post("/graphql", json=body, headers=headers)
            assert response.status_code == 400
            error = response.json()["errors"][0]
            assert error["extensions"] == {
                "code": "BAD_USER_INPUT",
                "field": "slices",
                "items": 5001,
                "maxItems": 5000,
            }
    assert statements == []  # not even the token lookup
    # At the maximum the request runs, and the READER meets the role check.
    body["variables"]["slices"] = slices[:5000]
    response = await stack.client.post("/graphql", json=body, headers=stack.auth("reader"))
    assert response.json()["errors"][0]["extensions"]["code"] == "FORBIDDEN"


async def test_the_body_limit_fits_the_largest_legitimate_batch(sqlite_local_stack: Stack) -> None:
    stack = sqlite_local_stack
    limit = DEFAULTS.max_request_bytes
    largest = max(
        len(largest_batch(mutation, item, indent))
        for mutation, item in ((REQUEST_URLS, LONGEST_UPLOAD), (COMPLETE, LONGEST_COMPLETION))
        for indent in (None, 4)
    )
    # Measured: 1.12 MB compact, 1.65 MB indented by four spaces (docs/security.md).
    assert largest < 1_700_000
    assert 2 * largest < limit < 4 * largest
    headers = {"Content-Type": "application/json"}
    body = largest_batch(REQUEST_URLS, LONGEST_UPLOAD, 4)
    accepted = await stack.client.post("/graphql", content=body, headers=headers)
    assert accepted.status_code == 200  # answered by the API, not refused for its size
    too_big = body[:-1] + b" " * (limit - len(body) + 1) + b"}"
    refused = await stack.client.post("/graphql", content=too_big, headers=headers)
    assert refused.status_code == 413


async def _groups_and_events(stack: Stack) -> tuple[int, int]:
    async with stack.sessionmaker() as session:
        groups = await session.scalar(select(func.count()).select_from(MaskGroup))
        events = await session.scalar(select(func.count()).select_from(AuditEvent))
    return groups or 0, events or 0


async def test_inference_parameters_are_bounded(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    limit = DEFAULTS.max_json_input_bytes
    envelope = len(json.dumps({"blob": ""}, separators=(",", ":")))

    def group(parameters: Any) -> dict[str, Any]:
        return {"input": {"annotationId": annotation_id, "inferenceParameters": parameters}}

    before = await _groups_and_events(stack)
    too_big = {"blob": "é" * ((limit - envelope) // 2 + 1)}  # counted in UTF-8 bytes
    error = await stack.error(CREATE_GROUP, group(too_big))
    assert error["extensions"] == {
        "code": "BAD_USER_INPUT",
        "field": "inferenceParameters",
        "bytes": limit + 1,
        "maxBytes": limit,
    }
    deep: Any = "leaf"
    for _ in range(40):
        deep = {"child": deep}
    for refused in (deep, [float("nan")], {"x": float("inf")}):
        # Python's json writes (and reads) NaN and Infinity; PostgreSQL's json refuses them.
        body = json.dumps({"query": CREATE_GROUP, "variables": group(refused)})
        response = await stack.client.post(
            "/graphql", content=body, headers={"Content-Type": "application/json"}
        )
        error = response.json()["errors"][0]
        assert error["extensions"]["field"] == "inferenceParameters", error
    assert await _groups_and_events(stack) == before  # nothing written, not even audit

    fits = {"blob": "x" * (limit - envelope)}
    data = await stack.data(CREATE_GROUP.replace("missingSliceIndexes", "id"), group(fits))
    assert data["createMaskGroup"]["id"]


async def test_deeply_nested_bodies_are_refused_before_authentication(
    sqlite_local_stack: Stack,
) -> None:
    stack = sqlite_local_stack
    nested = b"[" * 100_000 + b"]" * 100_000
    body = b'{"query": "{ me { user } }", "variables": {"a": ' + nested + b"}}"
    with count_statements(stack.services.engine) as statements:
        async with httpx.AsyncClient(base_url=stack.base_url) as anonymous:
            posted = await anonymous.post(
                "/graphql", content=body, headers={"Content-Type": "application/json"}
            )
            got = await anonymous.get(
                "/graphql",
                params={"query": "{ me { user } }", "variables": "[" * 2000 + "]" * 2000},
            )
    for response in (posted, got):
        assert response.status_code == 400
        assert "nested too deeply" in response.json()["errors"][0]["message"]
    assert statements == []
