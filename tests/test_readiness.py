"""/readyz names each dependency (database, migrations, storage) and answers 503 when any fails;
the audit clientIp believes X-Forwarded-For only from FORWARDED_ALLOW_IPS. Real server over
HTTP on loopback."""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Stack, auth_header, base_settings, make_tokens, serve
from operations import CREATE_ANNOTATION
from sqlalchemy import select

from app.config import Settings
from app.models import AuditEvent

ALL_OK = {"database": "ok", "migrations": "ok", "storage": "ok"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _readyz(settings: Settings) -> tuple[int, dict[str, Any], float]:
    async with serve(settings) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        started = time.monotonic()
        response = await client.get("/readyz", timeout=30)
        return response.status_code, response.json(), time.monotonic() - started


async def test_ready_when_everything_answers(own_sqlite_url: str, tmp_path: Path) -> None:
    settings = base_settings(database_url=own_sqlite_url, var_dir=tmp_path)
    status, body, _ = await _readyz(settings)
    assert (status, body) == (200, ALL_OK)


async def test_ready_on_each_stack(stack: Stack) -> None:
    # The storage probe is a real listing: on S3 it must find the bucket and nothing in it.
    response = await stack.client.get("/readyz")
    assert (response.status_code, response.json()) == (200, ALL_OK)


async def test_unreachable_storage_is_named_within_the_timeout(
    own_sqlite_url: str, tmp_path: Path
) -> None:
    settings = base_settings(
        database_url=own_sqlite_url,
        var_dir=tmp_path,
        storage_provider="s3",
        s3_endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        readiness_timeout=2,
    )
    status, body, seconds = await _readyz(settings)
    assert (status, body) == (503, {**ALL_OK, "storage": "unreachable"})
    assert seconds < 2 + 2  # the timeout, and margin for a loaded machine


async def test_a_database_off_the_migration_head_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    settings = base_settings(database_url=f"sqlite:///{empty}", var_dir=tmp_path)
    status, body, _ = await _readyz(settings)
    assert (status, body) == (503, {**ALL_OK, "migrations": "not at head"})


async def test_an_unreachable_database_is_named(tmp_path: Path) -> None:
    url = f"postgresql://nobody@127.0.0.1:{_closed_port()}/none"
    settings = base_settings(database_url=url, var_dir=tmp_path)
    status, body, _ = await _readyz(settings)
    expected = {"database": "unreachable", "migrations": "unknown", "storage": "ok"}
    assert (status, body) == (503, expected)


@pytest.mark.parametrize(
    ("trusted", "recorded"),
    [
        ([], "127.0.0.1"),  # the default: nobody's forwarded headers count
        (["10.0.0.1"], "127.0.0.1"),  # a proxy is configured, but this peer is not it
        (["127.0.0.1"], "203.0.113.7"),  # the peer is the configured proxy
        (["127.0.0.0/8"], "203.0.113.7"),  # networks work as in uvicorn
    ],
)
async def test_forwarded_for_counts_only_from_configured_proxies(
    own_sqlite_url: str, tmp_path: Path, trusted: list[str], recorded: str
) -> None:
    settings = base_settings(
        database_url=own_sqlite_url, var_dir=tmp_path, forwarded_allow_ips=trusted
    )
    async with serve(settings) as (services, base_url):
        tokens = await make_tokens(services.sessionmaker)
        headers = {**auth_header(tokens["admin"]), "X-Forwarded-For": "203.0.113.7"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
            response = await client.post(
                "/graphql",
                json={
                    "query": CREATE_ANNOTATION,
                    "variables": {"input": {"studyInstanceUid": "1.2"}},
                },
            )
        assert "errors" not in response.json(), response.text
        async with services.sessionmaker() as session:
            query = select(AuditEvent).where(AuditEvent.action == "annotation.create")
            event = (await session.scalars(query)).one()
    assert event.client_ip == recorded


def test_forwarded_allow_ips_is_a_comma_separated_list() -> None:
    settings = Settings(_env_file=None, forwarded_allow_ips="10.0.0.1, 10.1.0.0/16")  # type: ignore[arg-type]
    assert settings.forwarded_allow_ips == ["10.0.0.1", "10.1.0.0/16"]
    assert Settings(_env_file=None).forwarded_allow_ips == []
