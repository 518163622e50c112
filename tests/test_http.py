"""GraphQL over HTTP: media types, status codes, GET, GraphiQL, request ids, error masking."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest
from conftest import Stack, base_settings, content_md5, open_stack, png_bytes, serve
from flows import create_annotation, create_group
from operations import COMPLETE, REQUEST_URLS

GRAPHQL_RESPONSE = "application/graphql-response+json"


@pytest.fixture
def sqlite_stack(sqlite_local_stack: Stack) -> Stack:
    return sqlite_local_stack


async def test_graphql_response_media_type_and_status(sqlite_stack: Stack) -> None:
    client = sqlite_stack.client
    ok = await client.post(
        "/graphql", json={"query": "{ annotations { id } }"}, headers={"Accept": GRAPHQL_RESPONSE}
    )
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith(GRAPHQL_RESPONSE)
    assert ok.json() == {"data": {"annotations": []}}

    broken = await client.post(
        "/graphql", json={"query": "{ annotations { id "}, headers={"Accept": GRAPHQL_RESPONSE}
    )
    assert broken.status_code == 400
    assert "data" not in broken.json()
    invalid = await client.post(
        "/graphql", json={"query": "{ nope }"}, headers={"Accept": GRAPHQL_RESPONSE}
    )
    assert invalid.status_code == 400
    assert invalid.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"

    legacy = await client.post(
        "/graphql", json={"query": "{ nope }"}, headers={"Accept": "application/json"}
    )
    assert legacy.status_code == 200
    assert legacy.headers["content-type"].startswith("application/json")

    field_error = await client.post(
        "/graphql",
        json={"query": '{ annotation(id: "x") { id } }'},
        headers={"Accept": GRAPHQL_RESPONSE},
    )
    assert field_error.status_code == 200
    assert field_error.json()["data"] == {"annotation": None}


async def test_malformed_requests(sqlite_stack: Stack) -> None:
    client = sqlite_stack.client
    assert (
        await client.post("/graphql", content=b"{", headers={"Content-Type": "application/json"})
    ).status_code == 400
    assert (
        await client.post("/graphql", content=b"query", headers={"Content-Type": "text/plain"})
    ).status_code == 415
    assert (await client.post("/graphql", json={"variables": {}})).status_code == 400
    assert (
        await client.post("/graphql", json={"query": "{ annotations { id } }", "variables": [1]})
    ).status_code == 400
    refused = await client.post(
        "/graphql", json={"query": "{ annotations { id } }"}, headers={"Accept": "text/plain"}
    )
    assert refused.status_code == 406


async def test_get_runs_queries_not_mutations(sqlite_stack: Stack) -> None:
    client = sqlite_stack.client
    response = await client.get("/graphql", params={"query": "{ annotations { id } }"})
    assert response.status_code == 200
    assert response.json() == {"data": {"annotations": []}}
    mutation = 'mutation { createAnnotation(input: {studyInstanceUid: "1.2"}) { id } }'
    refused = await client.get("/graphql", params={"query": mutation})
    assert refused.status_code == 405
    assert refused.headers["allow"] == "POST"


async def test_graphiql_for_browsers(sqlite_stack: Stack) -> None:
    page = await sqlite_stack.client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert "graphiql" in page.text.lower()


async def test_request_id_is_echoed_and_generated(sqlite_stack: Stack) -> None:
    client = sqlite_stack.client
    mine = await client.post(
        "/graphql", json={"query": "{ annotations { id } }"}, headers={"X-Request-ID": "abc-123"}
    )
    assert mine.headers["x-request-id"] == "abc-123"
    generated = await client.post(
        "/graphql",
        json={"query": "{ annotations { id } }"},
        headers={"X-Request-ID": "bad id;" + "x" * 80},
    )
    assert len(generated.headers["x-request-id"]) == 32


async def test_health_and_readiness(sqlite_stack: Stack) -> None:
    assert (await sqlite_stack.client.get("/healthz")).text == "ok"
    assert (await sqlite_stack.client.get("/readyz")).status_code == 200


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unexpected_errors_are_masked_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = _closed_port()
    database_url = f"postgresql+asyncpg://nobody@127.0.0.1:{port}/none"
    # With authentication on, the token lookup is what meets the broken database.
    settings = base_settings(database_url=database_url, var_dir=tmp_path)
    async with serve(settings) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post(
            "/graphql",
            json={"query": '{ annotation(id: "1") { id } }'},
            headers={"Authorization": "Bearer pmk_some-token"},
        )
        ready = await client.get("/readyz")
    assert response.status_code == 500
    [error] = response.json()["errors"]
    assert error["message"] == "Internal server error"
    request_id = response.headers["x-request-id"]
    assert error["extensions"] == {"code": "INTERNAL_SERVER_ERROR", "requestId": request_id}
    assert str(port) not in response.text
    assert ready.status_code == 503
    assert request_id in caplog.text

    # Without authentication, a resolver meets it: masked the same way, with a path.
    settings = settings.model_copy(update={"auth_disabled": True})
    async with serve(settings) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post("/graphql", json={"query": '{ annotation(id: "1") { id } }'})
    [error] = response.json()["errors"]
    assert error["path"] == ["annotation"]
    assert error["extensions"]["code"] == "INTERNAL_SERVER_ERROR"
    assert "nobody" not in response.text
    assert str(port) not in response.text


async def test_storage_outage_is_storage_unavailable(own_sqlite_url: str, tmp_path: Path) -> None:
    from storage_servers import s3_settings

    port = _closed_port()
    settings = s3_settings(f"http://127.0.0.1:{port}", "k", "s", "pacs-masks").model_copy(
        update={"database_url": own_sqlite_url, "var_dir": tmp_path}
    )
    async with open_stack("outage", settings, ensure_bucket=False) as stack:
        annotation_id = await create_annotation(stack)
        group_id = await create_group(stack, annotation_id, 1)
        body = png_bytes(0)
        await stack.data(
            REQUEST_URLS,
            {
                "groupId": group_id,
                "slices": [
                    {"sliceIndex": 0, "fileSize": len(body), "contentMd5": content_md5(body)}
                ],
            },
        )
        error = await stack.error(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}]})
        assert error["extensions"]["code"] == "STORAGE_UNAVAILABLE"
        deleted = await stack.data(
            "mutation($id: ID!) { deleteMaskGroup(id: $id) { deletedMaskCount storageCleanupPending } }",
            {"id": group_id},
        )
        # The rows are gone; the objects are recorded for the cleanup job.
        assert deleted["deleteMaskGroup"] == {"deletedMaskCount": 0, "storageCleanupPending": True}
        await asyncio.sleep(0)


async def test_cors_only_for_configured_origins(tmp_path: Path, own_sqlite_url: str) -> None:
    settings = base_settings(
        database_url=own_sqlite_url, var_dir=tmp_path, cors_origins=["https://viewer.example"]
    )
    async with serve(settings) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        preflight = await client.options(
            "/storage/mask/1/1/slice_00000.png",
            headers={
                "Origin": "https://viewer.example",
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "content-md5,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://viewer.example"
        other = await client.post(
            "/graphql",
            json={"query": "{ annotations { id } }"},
            headers={"Origin": "https://evil.example"},
        )
        assert "access-control-allow-origin" not in other.headers
