"""Odd but harmless requests get their 4xx or coded error, never a 500: operation names,
ids beyond the id columns (PostgreSQL's integer), odd view parameters."""

from __future__ import annotations

import json

import pytest
from conftest import Stack
from flows import create_annotation, create_group, upload

BEYOND = ["2147483648", "99999999999", "1" + "0" * 22, "0" * 30 + "2147483648"]


async def test_unknown_or_missing_operation_names(sqlite_local_stack: Stack) -> None:
    client = sqlite_local_stack.client
    two = "query A { me { user } } query B { me { role } }"
    cases = [
        ({"query": "query A { me { user } }", "operationName": "B"}, "no operation named 'B'"),
        ({"query": two}, "operationName must name one"),
        ({"query": two, "operationName": "C"}, "no operation named 'C'"),
    ]
    for body, message in cases:
        for accept in ("application/json", "application/graphql-response+json"):
            response = await client.post("/graphql", json=body, headers={"Accept": accept})
            assert response.status_code == 400, response.text
            error = response.json()["errors"][0]
            assert error["extensions"]["code"] == "BAD_USER_INPUT"
            assert message in error["message"]
        response = await client.get("/graphql", params=body)
        assert response.status_code == 400
    chosen = await client.post("/graphql", json={"query": two, "operationName": "B"})
    assert chosen.json() == {"data": {"me": {"role": "UPLOADER"}}}


async def test_ids_beyond_the_id_columns_are_not_found(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    queries = [
        "query($id: ID!) { annotation(id: $id) { id } }",
        "query($id: ID!) { maskGroup(id: $id) { id } }",
        "query($id: ID!) { mask(id: $id) { id } }",
        "query($id: ID!) { auditEvents(annotationId: $id) { id } }",
        "query($id: ID!) { auditEvents(maskGroupId: $id) { id } }",
        "mutation($id: ID!) { deleteMaskGroup(id: $id) { id } }",
        (
            "mutation($id: ID!) { requestMaskUploadUrls(groupId: $id, slices: [{sliceIndex: 0, "
            'fileSize: 1, contentMd5: "4/ukI2WU1u7QvYjGm7ZmRA=="}]) { url } }'
        ),
        (
            "mutation($id: ID!) { completeMaskUpload(groupId: $id, slices: [{sliceIndex: 0}]) "
            "{ masks { id } } }"
        ),
        "mutation($id: ID!) { createMaskGroup(input: {annotationId: $id}) { id } }",
    ]
    for query in queries:
        for value in BEYOND:
            error = await stack.error(query, {"id": value}, as_="admin")
            assert error["extensions"]["code"] == "NOT_FOUND", (query, value, error)
    # The largest id that fits is simply absent.
    absent = await stack.data('{ annotation(id: "2147483647") { id } }', as_="admin")
    assert absent == {"annotation": None}
    assert annotation_id


@pytest.mark.parametrize("served_stack", ["sqlite-local"], indirect=True)
async def test_view_parameters(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    await upload(stack, group_id, [0])
    view = f"/api/mask-group/{group_id}/view"
    assert (await stack.client.get(view, params={"slice": "0"})).status_code == 200
    cases = [
        (view, {"slice": "²"}, 400, "slice must be a non-negative integer"),
        (view, {"slice": "-1"}, 400, "slice must be a non-negative integer"),
        (view, {"slice": "0", "label": "bad!"}, 400, "label must match"),
        (view, {"slice": "0", "label": "tumor\n"}, 400, "label must match"),
        (view, {"slice": "1" + "0" * 22}, 404, "no such mask"),
        (view, {"slice": "2147483648"}, 404, "no such mask"),
        (view, {"slice": "000000000000001"}, 404, "no such mask"),
        ("/api/mask-group/" + "1" + "0" * 22 + "/view", {"slice": "0"}, 404, "no such mask"),
        ("/api/mask-group/2147483648/view", {"slice": "0"}, 404, "no such mask"),
    ]
    for path, params, status, message in cases:
        response = await stack.client.get(path, params=params)
        assert response.status_code == status, (path, params)
        assert response.text.startswith(message), (path, params)


async def test_text_the_databases_cannot_store_is_refused(stack: Stack) -> None:
    # PostgreSQL refuses NUL in text; an unpaired surrogate is not UTF-8 on either database.
    filters = "query($study: String) { annotations(studyInstanceUid: $study) { id } }"
    create = "mutation($input: CreateAnnotationInput!) { createAnnotation(input: $input) { id } }"
    cases = [
        (filters, {"study": "1.2\u0000"}, "NUL"),
        ('{ auditEvents(actor: "a\\u0000b") { id } }', {}, "NUL"),
        (create, {"input": {"studyInstanceUid": "1.2", "label": "\ud800"}}, "surrogate"),
        (create, {"input": {"studyInstanceUid": "1.2", "label": "a\u0000"}}, "NUL"),
    ]
    for query, variables, problem in cases:
        # Python's json escapes the surrogate as \ud800, as a client library would.
        body = json.dumps({"query": query, "variables": variables})
        response = await stack.client.post(
            "/graphql",
            content=body,
            headers={"Content-Type": "application/json", **stack.auth("admin")},
        )
        assert response.status_code == 400, response.text
        error = response.json()["errors"][0]
        assert error["extensions"]["code"] == "BAD_USER_INPUT"
        assert problem in error["message"]
