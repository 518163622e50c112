"""The command line: the embedded default starts with no setup; migrate; export-schema."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import base_settings
from sqlalchemy import select

from app.auth import authenticate
from app.db import create_engine, create_sessionmaker
from app.errors import Unauthenticated
from app.models import ApiToken, AuditEvent, utcnow
from app.principals import Principal, Role

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    # The embedded default: no DATABASE_URL, no storage settings.
    return {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}


def _start(tmp_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(BIN / "pacs-masks"), "serve", "--port", str(port)],
            cwd=tmp_path,
            env=_clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_healthy(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            return
        except httpx.TransportError:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start within 30 s"
            time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=15)


CREATE = 'mutation { createAnnotation(input: {studyInstanceUid: "1.2.3"}) { id createdBy } }'


def test_serve_on_the_embedded_default(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
    process = _start(tmp_path, port, log)
    try:
        _wait_healthy(process, port, log)
        url = f"http://127.0.0.1:{port}/graphql"
        output = log.read_text()
        token = output.split("it is shown only once:\n", 1)[1].split()[0]
        refused = httpx.post(url, json={"query": CREATE})
        assert refused.status_code == 401
        created = httpx.post(
            url, json={"query": CREATE}, headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert created == {"data": {"createAnnotation": {"id": "1", "createdBy": "admin"}}}
    finally:
        _stop(process)
    assert f"GraphiQL at {url}" in output
    assert f"viewer at http://127.0.0.1:{port}/viewer/" in output
    assert (tmp_path / "var" / "pacs-masks.db").exists()
    assert (tmp_path / "var" / "storage").is_dir()

    # The next start reuses the database and prints no new token.
    process = _start(tmp_path, port, log)
    try:
        _wait_healthy(process, port, log)
    finally:
        _stop(process)
    assert log.read_text().count("shown only once") == 1


def test_serve_refuses_a_public_address_without_authentication(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "pacs-masks"), "serve", "--host", "0.0.0.0", "--port", str(_free_port())],
        cwd=tmp_path,
        env={**_clean_env(), "AUTH_DISABLED": "true"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr


def test_migrate_and_export_schema(tmp_path: Path) -> None:
    env = {**_clean_env(), "DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"}
    migrated = _cli(tmp_path, env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert (tmp_path / "m.db").exists()
    exported = _cli(tmp_path, env, "export-schema")
    assert exported.returncode == 0, exported.stderr
    assert "requestMaskUploadUrls" in exported.stdout


def _cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pacs-masks"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


async def test_token_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    env = {**_clean_env(), "DATABASE_URL": url}
    assert _cli(tmp_path, env, "migrate").returncode == 0
    created = _cli(
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

        listing = _cli(tmp_path, env, "list-tokens")
        assert "worker-7" in listing.stdout
        assert "active" in listing.stdout
        assert secret not in listing.stdout
        async with sessionmaker() as session:
            stored = (await session.scalars(select(ApiToken))).one()
            assert stored.token_hash != secret
            assert (
                secret not in (stored.token_prefix + stored.token_hash)[len(stored.token_prefix) :]
            )

        revoked = _cli(tmp_path, env, "revoke-token", str(stored.id))
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(Unauthenticated):
            await authenticate(sessionmaker, secret, oidc=None, now=utcnow())
        assert "revoked" in _cli(tmp_path, env, "list-tokens").stdout
        again = _cli(tmp_path, env, "revoke-token", str(stored.id))
        assert again.returncode == 1

        async with sessionmaker() as session:
            actions = [
                (event.action, event.actor.startswith("cli:"))
                for event in await session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            ]
        assert actions == [("token.create", True), ("token.revoke", True)]
    finally:
        await engine.dispose()

    refused = _cli(tmp_path, env, "create-token", "--user", "x", "--role", "superuser")
    assert refused.returncode == 2
