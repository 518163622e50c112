"""The server's log as a collector reads it: JSON lines with the request id, user, operation and
duration on every request line; no token and no signed query string anywhere."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from commands import ServedProcess, clean_env, served
from conftest import content_md5, png_bytes
from operations import CREATE_ANNOTATION, CREATE_GROUP, REQUEST_URLS

BODY = png_bytes(7)


def _gql(
    server: ServedProcess, query: str, variables: dict[str, Any], request_id: str
) -> dict[str, Any]:
    response = httpx.post(
        f"{server.base_url}/graphql",
        json={"query": query, "variables": variables},
        headers={"Authorization": f"Bearer {server.token}", "X-Request-ID": request_id},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert "errors" not in body, body
    data: dict[str, Any] = body["data"]
    return data


def _traffic(tmp_path: Path, log_format: str) -> tuple[ServedProcess, str, str]:
    """Creates a group, uploads one slice through the local backend's signed URL and reads a
    mask that does not exist; returns the server, the signed URL and the log."""
    with served(tmp_path, clean_env(LOG_FORMAT=log_format)) as server:
        assert server.token is not None
        annotation = _gql(
            server, CREATE_ANNOTATION, {"input": {"studyInstanceUid": "1.2.3"}}, "req-annotation"
        )["createAnnotation"]
        group = _gql(
            server,
            CREATE_GROUP,
            {"input": {"annotationId": annotation["id"], "sliceCount": 1}},
            "req-group",
        )["createMaskGroup"]
        slices = [{"sliceIndex": 0, "fileSize": len(BODY), "contentMd5": content_md5(BODY)}]
        [target] = _gql(
            server, REQUEST_URLS, {"groupId": group["id"], "slices": slices}, "req-urls"
        )["requestMaskUploadUrls"]
        headers = {item["name"]: item["value"] for item in target["headers"]}
        put = httpx.put(target["url"], content=BODY, headers={**headers, "X-Request-ID": "req-put"})
        assert put.status_code == 200
        missing = httpx.get(
            f"{server.base_url}/api/mask-group/{group['id']}/view?slice=0",
            headers={"Authorization": f"Bearer {server.token}", "X-Request-ID": "req-view"},
        )
        assert missing.status_code == 404
    return server, target["url"], server.stderr.read_text()


async def test_json_request_lines_carry_id_user_operation_and_duration(tmp_path: Path) -> None:
    server, signed_url, log = await asyncio.to_thread(_traffic, tmp_path, "json")
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    requests = {line["request_id"]: line for line in lines if line["logger"] == "app.access"}

    urls = requests["req-urls"]
    assert urls["user"] == "admin"
    assert urls["operation"] == "mutation:requestMaskUploadUrls"
    assert urls["method"] == "POST"
    assert urls["path"] == "/graphql"
    assert urls["route"] == "/graphql"
    assert urls["status"] == 200
    assert urls["duration_ms"] > 0
    assert urls["level"] == "INFO"
    assert datetime.fromisoformat(urls["time"]).utcoffset() == timedelta(0)

    put = requests["req-put"]
    assert put["route"] == "/storage/{key:path}"
    assert put["path"].startswith("/storage/mask/1/1/slice_00000")
    assert put["user"] is None
    view = requests["req-view"]
    assert (view["status"], view["user"]) == (404, "admin")

    # Neither the signature nor the token is written anywhere, in any line.
    assert signed_url.split("?", 1)[1] not in log
    assert "signature=" not in log
    assert server.token not in log


async def test_text_lines_for_people(tmp_path: Path) -> None:
    server, _, log = await asyncio.to_thread(_traffic, tmp_path, "text")
    [line] = [line for line in log.splitlines() if "[req-group]" in line]
    assert "INFO app.access [req-group] POST /graphql 200" in line
    assert "signature=" not in log
    assert server.token not in log
