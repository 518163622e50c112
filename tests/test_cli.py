"""The command line: the embedded default starts with no setup; migrate; export-schema."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from commands import BIN, clean_env, run_cli, served
from conftest import base_settings
from sqlalchemy import select

from app.auth import authenticate
from app.db import create_engine, create_sessionmaker
from app.errors import Unauthenticated
from app.models import ApiToken, AuditEvent, utcnow
from app.principals import Principal, Role


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CREATE = 'mutation { createAnnotation(input: {studyInstanceUid: "1.2.3"}) { id createdBy } }'


def test_serve_on_the_embedded_default(tmp_path: Path) -> None:
    with served(tmp_path, clean_env()) as server:
        url = f"{server.base_url}/graphql"
        assert server.token is not None
        refused = httpx.post(url, json={"query": CREATE})
        assert refused.status_code == 401
        created = httpx.post(
            url, json={"query": CREATE}, headers={"Authorization": f"Bearer {server.token}"}
        ).json()
        assert created == {"data": {"createAnnotation": {"id": "1", "createdBy": "admin"}}}
    printed = server.stdout.read_text()
    assert f"GraphiQL at {url}" in printed
    assert f"viewer at {server.base_url}/viewer/" in printed
    assert (tmp_path / "var" / "pacs-masks.db").exists()
    assert (tmp_path / "var" / "storage").is_dir()

    # The next start reuses the database and prints no new token.
    with served(tmp_path, clean_env()) as again:
        assert again.token is None
    assert "shown only once" not in again.stdout.read_text()


def test_serve_refuses_a_public_address_without_authentication(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "pacs-masks"), "serve", "--host", "0.0.0.0", "--port", str(_free_port())],
        cwd=tmp_path,
        env={**clean_env(), "AUTH_DISABLED": "true"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr


def test_migrate_and_export_schema(tmp_path: Path) -> None:
    env = {**clean_env(), "DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"}
    migrated = run_cli(tmp_path, env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert (tmp_path / "m.db").exists()
    exported = run_cli(tmp_path, env, "export-schema")
    assert exported.returncode == 0, exported.stderr
    assert "requestMaskUploadUrls" in exported.stdout


async def test_token_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    env = {**clean_env(), "DATABASE_URL": url}
    assert run_cli(tmp_path, env, "migrate").returncode == 0
    created = run_cli(
        tmp_path,
        env,
        "create-token",
        "--user",
        "worker-7",
        "--role",
        "uploader",
        "--expires-days",
        "30",
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("pmk_")
    assert len(secret) > 40

    settings = base_settings(database_url=url, var_dir=tmp_path)
    engine = create_engine(settings.resolved_database_url)
    sessionmaker = create_sessionmaker(engine)
    try:
        principal = await authenticate(sessionmaker, secret, oidc=None, now=utcnow())
        assert principal == Principal("worker-7", Role.UPLOADER)

        listing = run_cli(tmp_path, env, "list-tokens")
        assert "worker-7" in listing.stdout
        assert "active" in listing.stdout
        assert secret not in listing.stdout
        async with sessionmaker() as session:
            stored = (await session.scalars(select(ApiToken))).one()
            assert stored.token_hash != secret
            assert (
                secret not in (stored.token_prefix + stored.token_hash)[len(stored.token_prefix) :]
            )

        revoked = run_cli(tmp_path, env, "revoke-token", str(stored.id))
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(Unauthenticated):
            await authenticate(sessionmaker, secret, oidc=None, now=utcnow())
        assert "revoked" in run_cli(tmp_path, env, "list-tokens").stdout
        again = run_cli(tmp_path, env, "revoke-token", str(stored.id))
        assert again.returncode == 1

        async with sessionmaker() as session:
            actions = [
                (event.action, event.actor.startswith("cli:"))
                for event in await session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            ]
        assert actions == [("token.create", True), ("token.revoke", True)]
    finally:
        await engine.dispose()

    refused = run_cli(tmp_path, env, "create-token", "--user", "x", "--role", "superuser")
    assert refused.returncode == 2
