"""The viewer and GraphiQL pages: served from app/static under a same-origin CSP, SPA routes,
GRAPHIQL=false, and a committed build that matches its sources."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import IS_CI, Stack, base_settings, serve, unavailable

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "app" / "static"
VIEWER_SOURCES = ROOT / "viewer"


@pytest.fixture
def sqlite_stack(sqlite_local_stack: Stack) -> Stack:
    return sqlite_local_stack


def _assert_same_origin_page(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self';" in policy
    assert "connect-src 'self';" in policy
    assert "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert "https:" not in policy
    assert "unpkg" not in policy
    # Every script and stylesheet the page names is one of ours.
    for reference in re.findall(r'(?:src|href)="([^"]+)"', response.text):
        assert reference.startswith(("/", "data:")), reference


async def test_viewer_pages_and_assets(sqlite_stack: Stack) -> None:
    client = sqlite_stack.client
    redirect = await client.get("/viewer", follow_redirects=False)
    assert redirect.status_code in (301, 307, 308)
    assert redirect.headers["location"].endswith("/viewer/")
    index = await client.get("/viewer/")
    _assert_same_origin_page(index)
    assert '<script type="module" src="/viewer/app.js">' in index.text
    # The viewer's own routes survive a reload: they get the same page.
    deep = await client.get("/viewer/groups/12")
    _assert_same_origin_page(deep)
    assert deep.text == index.text
    script = await client.get("/viewer/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert script.headers["cache-control"] == "no-cache"
    assert "etag" in script.headers
    assert (await client.get("/viewer/missing.js")).status_code == 404
    assert (await client.get("/viewer/../pyproject.toml")).status_code == 404


async def test_graphiql_is_served_from_our_files(sqlite_stack: Stack) -> None:
    client = sqlite_stack.client
    page = await client.get("/graphql", headers={"Accept": "text/html"})
    _assert_same_origin_page(page)
    assert '<script defer src="/graphiql/graphiql.js">' in page.text
    for asset in ("/graphiql/graphiql.js", "/graphiql/graphiql.css"):
        assert (await client.get(asset)).status_code == 200


async def test_graphiql_can_be_switched_off(own_sqlite_url: str, tmp_path: Path) -> None:
    settings = base_settings(database_url=own_sqlite_url, var_dir=tmp_path, graphiql=False)
    async with serve(settings) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        assert (await client.get("/graphql", headers={"Accept": "text/html"})).status_code == 404
        assert (await client.get("/graphiql/graphiql.js")).status_code == 404
        assert (await client.get("/viewer/")).status_code == 200


async def test_s3_storage_origin_is_the_only_other_connect_source(
    own_sqlite_url: str, tmp_path: Path
) -> None:
    from app.static_routes import page_headers

    settings = base_settings(
        database_url=own_sqlite_url,
        var_dir=tmp_path,
        storage_provider="s3",
        s3_endpoint_url="http://minio:9000",
        s3_public_endpoint_url="https://s3.hospital.example:9000/ignored/path",
    )
    policy = page_headers(settings)["Content-Security-Policy"]
    assert "connect-src 'self' https://s3.hospital.example:9000;" in policy


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("npm") is None:
        if IS_CI:
            pytest.fail("npm is missing (required under CI=true)", pytrace=False)
        pytest.skip("npm is missing: the committed build cannot be checked")
    work = tmp_path_factory.mktemp("viewer")
    for name in ("package.json", "package-lock.json", "build.mjs", "tsconfig.json", "src"):
        source = VIEWER_SOURCES / name
        if source.is_dir():
            shutil.copytree(source, work / name)
        else:
            shutil.copy2(source, work / name)
    env = {**os.environ, "npm_config_audit": "false", "npm_config_fund": "false"}
    for command in (
        ["npm", "ci", "--prefer-offline"],
        ["npm", "run", "build", "--", str(work / "out")],
    ):
        result = subprocess.run(
            command, cwd=work, capture_output=True, text=True, env=env, check=False
        )
        if result.returncode != 0:
            unavailable(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    return work / "out"


def _tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_committed_build_matches_the_sources(fresh_build: Path) -> None:
    assert _tree(fresh_build) == _tree(STATIC), "run `npm ci && npm run build` in viewer/"
    stale = [
        name for name in _tree(STATIC) if not filecmp.cmp(fresh_build / name, STATIC / name, False)
    ]
    assert stale == [], "app/static is stale: run `npm ci && npm run build` in viewer/"
