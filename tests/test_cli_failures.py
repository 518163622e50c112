"""The command line as a new operator meets it: every failure is one line on stderr saying what
is wrong and what to do, with the exit code README's table documents, and never a traceback.

Each case runs the real `pacs-masks` command in a fresh directory."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from commands import clean_env, run_cli
from conftest import POSTGRES_ADMIN_URL, unavailable

from app.cli_failures import ExitCode


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_fails(result: subprocess.CompletedProcess[str], code: ExitCode, *words: str) -> str:
    """Exactly one line on stderr, containing `words`; nothing on stdout; the exit code."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stdout == ""
    [line] = lines
    assert line.startswith("pacs-masks")
    for word in words:
        assert word in line
    return line


S3_CLOSED = {
    "STORAGE_PROVIDER": "s3",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
}


@pytest.mark.parametrize(
    ("args", "settings", "code", "words"),
    [
        (["list-tokens"], {}, ExitCode.DATABASE, ["no database file", "pacs-masks migrate"]),
        (
            ["create-token", "--user", "a", "--role", "admin"],
            {},
            ExitCode.DATABASE,
            ["not migrated", "pacs-masks migrate"],
        ),
        (["revoke-token", "1"], {}, ExitCode.DATABASE, ["pacs-masks migrate"]),
        (["list-tokens"], {"DATABASE_URL": "garbage"}, ExitCode.CONFIGURATION, ["DATABASE_URL"]),
        (
            ["migrate"],
            {"DATABASE_URL": "mysql://someone@127.0.0.1/masks"},
            ExitCode.CONFIGURATION,
            ["DATABASE_URL", "postgresql://"],
        ),
        (
            ["migrate"],
            {"DATABASE_URL": "postgresql://nobody@127.0.0.1:{closed}/none"},
            ExitCode.DATABASE,
            ["cannot use the database", "check DATABASE_URL"],
        ),
        (
            ["serve"],
            {"DATABASE_URL": "postgresql://nobody@127.0.0.1:{closed}/none"},
            ExitCode.DATABASE,
            ["check DATABASE_URL"],
        ),
        (
            ["list-tokens"],
            {"DATABASE_URL": "sqlite:///{cwd}/no/such/folder/x.db"},
            ExitCode.DATABASE,
            ["pacs-masks migrate"],
        ),
        (
            ["migrate"],
            {"DATABASE_URL": "sqlite:///{cwd}/no/such/folder/x.db"},
            ExitCode.DATABASE,
            ["does not exist"],
        ),
        (["serve"], {"SIGNED_URL_MAX_TTL": "abc"}, ExitCode.CONFIGURATION, ["SIGNED_URL_MAX_TTL"]),
        (
            ["list-tokens"],
            {"OIDC_ROLE_MAP": "not json"},
            ExitCode.CONFIGURATION,
            ["OIDC_ROLE_MAP"],
        ),
        (
            ["serve"],
            {"SIGNED_URL_DEFAULT_TTL": "7200"},
            ExitCode.CONFIGURATION,
            ["SIGNED_URL_DEFAULT_TTL must not exceed SIGNED_URL_MAX_TTL"],
        ),
        (
            ["serve"],
            {"OIDC_ISSUER": "https://idp.example"},
            ExitCode.CONFIGURATION,
            ["OIDC_AUDIENCE"],
        ),
        (["serve"], {"VAR_DIR": "/proc/none"}, ExitCode.CONFIGURATION, ["VAR_DIR"]),
        (["list-tokens"], {"LOG_LEVEL": "loud"}, ExitCode.CONFIGURATION, ["LOG_LEVEL"]),
        (
            ["serve"],
            {"LOCAL_STORAGE_DIR": "/proc/none"},
            ExitCode.CONFIGURATION,
            ["LOCAL_STORAGE_DIR"],
        ),
        (
            ["setup-storage"],
            {**S3_CLOSED, "S3_ENDPOINT_URL": "http://127.0.0.1:{closed}"},
            ExitCode.STORAGE,
            ["storage unavailable", "S3_ENDPOINT_URL"],
        ),
        (
            ["serve"],
            {**S3_CLOSED, "S3_ENDPOINT_URL": "http://127.0.0.1:{closed}"},
            ExitCode.STORAGE,
            ["storage unavailable", "S3_ENDPOINT_URL"],
        ),
        (["create-token", "--user", "x", "--role", "root"], {}, ExitCode.USAGE, ["--role"]),
        (["no-such-command"], {}, ExitCode.USAGE, ["--help"]),
        (["serve", "--port", "eighty"], {}, ExitCode.USAGE, ["--port"]),
        (
            ["serve", "--host", "0.0.0.0"],
            {"AUTH_DISABLED": "true"},
            ExitCode.USAGE,
            ["AUTH_DISABLED"],
        ),
        # Several workers need PostgreSQL: SQLite's live events stay in their process.
        (["serve", "--workers", "2"], {}, ExitCode.USAGE, ["2 workers on SQLite", "PostgreSQL"]),
        (["serve"], {"WORKERS": "3"}, ExitCode.USAGE, ["3 workers on SQLite", "--workers 1"]),
        (
            ["serve", "--workers", "2"],
            {"DATABASE_URL": "sqlite:///{cwd}/x.db"},
            ExitCode.USAGE,
            ["workers on SQLite"],
        ),
        (["serve", "--workers", "0"], {}, ExitCode.USAGE, ["--workers", "at least 1"]),
        (["serve"], {"WORKERS": "0"}, ExitCode.CONFIGURATION, ["WORKERS"]),
    ],
)
def test_each_failure_is_one_line_and_its_exit_code(
    tmp_path: Path, args: list[str], settings: dict[str, str], code: ExitCode, words: list[str]
) -> None:
    closed = str(_closed_port())
    values = {name: value.format(closed=closed, cwd=tmp_path) for name, value in settings.items()}
    result = run_cli(tmp_path, clean_env(**values), *args)
    line = assert_fails(result, code, *words)
    # A password in DATABASE_URL is never echoed; neither is a secret setting's value.
    assert "testing" not in line


def test_nothing_is_created_by_a_command_that_fails(tmp_path: Path) -> None:
    # A token command in the wrong folder must not leave an empty database behind.
    assert_fails(run_cli(tmp_path, clean_env(), "list-tokens"), ExitCode.DATABASE)
    assert list(tmp_path.iterdir()) == []


def test_serve_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_cli(tmp_path, clean_env(), "serve", "--port", port)
    assert_fails(result, ExitCode.ADDRESS, f"127.0.0.1:{port}", "--port")


def test_revoking_an_unknown_token_is_a_refusal(tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=f"sqlite:///{tmp_path / 'm.db'}")
    assert run_cli(tmp_path, env, "migrate").returncode == 0
    assert_fails(run_cli(tmp_path, env, "revoke-token", "99"), ExitCode.FAILED, "99")


@pytest.fixture
async def unmigrated_postgres() -> AsyncIterator[str]:
    """An empty PostgreSQL database of this test's own: reachable, never migrated."""
    name = f"pacs_masks_unmigrated_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        unavailable(f"PostgreSQL does not answer: {error}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.mark.postgres
async def test_unmigrated_postgres_is_refused_until_migrated(
    tmp_path: Path, unmigrated_postgres: str
) -> None:
    env = clean_env(DATABASE_URL=unmigrated_postgres)
    for args in (["serve", "--port", str(_closed_port())], ["list-tokens"]):
        result = run_cli(tmp_path, env, *args)
        assert_fails(result, ExitCode.DATABASE, "not migrated", "pacs-masks migrate")

    migrated = run_cli(tmp_path, env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    listed = run_cli(tmp_path, env, "list-tokens")
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""
