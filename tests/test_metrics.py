"""/metrics after real flows: counters move, the exposition parses with prometheus-client's own
parser, storage usage gauges come from the database; refused without the right credentials;
several worker processes aggregate through PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import httpx
import yaml
from commands import clean_env, served
from conftest import Stack, base_settings, make_tokens, open_stack, png_bytes, serve
from flows import create_annotation, create_group, slice_inputs, upload
from operations import COMPLETE, DELETE_GROUP, REQUEST_URLS
from prometheus_client.parser import text_string_to_metric_families
from storage_servers import s3_settings

from app.db import create_engine, create_sessionmaker

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SIZE = len(png_bytes(0))


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(stack: Stack) -> Samples:
    response = await stack.client.get("/metrics", headers=stack.auth("admin"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


async def test_counters_move_with_a_real_flow(stack: Stack) -> None:
    before = await scrape(stack)
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 4, modelName="metrics-seg")
    await upload(stack, group_id, range(3))
    refused = await stack.error(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 3}]})
    assert refused["extensions"]["code"] == "UPLOAD_INCOMPLETE"
    after = await scrape(stack)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("pacs_masks_upload_urls_issued_total") == 3
    assert moved("pacs_masks_slices_completed_total") == 3
    assert moved("pacs_masks_bytes_registered_total") == 3 * SIZE
    assert moved("pacs_masks_completion_failures_total", code="UPLOAD_INCOMPLETE") == 1
    assert moved("pacs_masks_actions_total", action="upload.complete") == 1
    complete = "mutation:completeMaskUpload"
    assert moved("pacs_masks_graphql_requests_total", operation=complete, outcome="ok") == 1
    assert moved("pacs_masks_graphql_requests_total", operation=complete, outcome="error") == 1
    assert moved("pacs_masks_graphql_request_duration_seconds_count", operation=complete) == 2
    assert (
        moved(
            "pacs_masks_graphql_errors_total", field="completeMaskUpload", code="UPLOAD_INCOMPLETE"
        )
        == 1
    )
    # Five GraphQL calls (annotation, group, URLs, completion, the refused completion) and the
    # first scrape, by route template: never a path or a query string.
    assert (
        moved("pacs_masks_http_requests_total", route="/graphql", method="POST", status="200") == 5
    )
    assert (
        moved("pacs_masks_http_requests_total", route="/metrics", method="GET", status="200") == 1
    )
    assert not [key for key in after if "/graphql?" in str(key) or "/storage/mask" in str(key)]

    assert value(after, "pacs_masks_stored_bytes", model="metrics-seg") == 3 * SIZE
    assert value(after, "pacs_masks_stored_objects", model="metrics-seg") == 3
    assert value(after, "pacs_masks_mask_groups", model="metrics-seg") == 1


async def test_metrics_need_an_admin_or_the_metrics_token(stack: Stack) -> None:
    anonymous = await stack.client.get("/metrics", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert "pacs_masks" not in anonymous.text
    for role in ("reader", "uploader"):
        assert (await stack.client.get("/metrics", headers=stack.auth(role))).status_code == 403
    forged = await stack.client.get("/metrics", headers={"Authorization": "Bearer pmk_forged"})
    assert forged.status_code == 401


async def test_metrics_token_and_public_setting(own_sqlite_url: str, tmp_path: Path) -> None:
    token = "metrics-scraper-secret-0123456789"
    settings = base_settings(database_url=own_sqlite_url, var_dir=tmp_path, metrics_token=token)
    async with serve(settings) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        allowed = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert allowed.status_code == 200
        assert "pacs_masks_http_requests_total" in allowed.text
        wrong = await client.get("/metrics", headers={"Authorization": f"Bearer {token}x"})
        assert wrong.status_code == 401
        # An ADMIN token still works beside the scraper's token.
        engine = create_engine(own_sqlite_url)
        tokens = await make_tokens(create_sessionmaker(engine))
        await engine.dispose()
        admin = await client.get("/metrics", headers={"Authorization": f"Bearer {tokens['admin']}"})
        assert admin.status_code == 200

    public = base_settings(database_url=own_sqlite_url, var_dir=tmp_path, metrics_public=True)
    async with serve(public) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        assert (await client.get("/metrics")).status_code == 200


def _multiprocess_scrape(tmp_path: Path, multiproc_dir: Path) -> tuple[str, list[Path]]:
    env = clean_env(
        PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir), METRICS_TOKEN="scrape-token-0123456789"
    )
    with served(tmp_path, env) as server:
        for _ in range(3):
            assert httpx.get(f"{server.base_url}/healthz").status_code == 200
        me = httpx.post(
            f"{server.base_url}/graphql",
            json={"query": "{ me { user } }"},
            headers={"Authorization": f"Bearer {server.token}"},
        )
        assert me.status_code == 200
        response = httpx.get(
            f"{server.base_url}/metrics",
            headers={"Authorization": "Bearer scrape-token-0123456789"},
        )
        assert response.status_code == 200
        return response.text, sorted(multiproc_dir.iterdir())


async def test_multiprocess_collector_aggregates_from_the_shared_folder(tmp_path: Path) -> None:
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    text, files = await asyncio.to_thread(_multiprocess_scrape, tmp_path, multiproc_dir)
    # Each worker writes its samples to files of its own there; /metrics reads them all.
    assert [path.name for path in files if path.suffix == ".db"]
    samples = parse(text)
    assert (
        value(
            samples,
            "pacs_masks_http_requests_total",
            route="/healthz",
            method="GET",
            status="200",
        )
        >= 3
    )
    assert value(samples, "pacs_masks_graphql_requests_total", operation="query:me", outcome="ok")
    # The usage gauges come from the database, not from the worker files.
    assert "# TYPE pacs_masks_stored_bytes gauge" in text


async def test_dashboard_and_scrape_example_use_the_exposed_metrics(stack: Stack) -> None:
    text = (await stack.client.get("/metrics", headers=stack.auth("admin"))).text
    exposed = set(re.findall(r"^# TYPE (pacs_masks_\w+) (\w+)", text, re.MULTILINE))
    names = set()
    for name, kind in exposed:
        suffixes = {"histogram": ["_bucket", "_count", "_sum"]}
        names.update(name + suffix for suffix in suffixes.get(kind, [""]))
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "pacs-masks.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"pacs_masks_\w+", expr)}
    assert used
    assert used <= names, used - names

    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_storage_and_database_errors_are_counted(
    stack: Stack, own_sqlite_url: str, tmp_path: Path
) -> None:
    before = await scrape(stack)
    storage_down = s3_settings(f"http://127.0.0.1:{_closed_port()}", "k", "s", "pacs-masks")
    settings = storage_down.model_copy(update={"database_url": own_sqlite_url, "var_dir": tmp_path})
    async with open_stack("storage-down", settings, ensure_bucket=False) as down:
        annotation_id = await create_annotation(down)
        group_id = await create_group(down, annotation_id, 1)
        slices, _ = slice_inputs([0])
        await down.data(REQUEST_URLS, {"groupId": group_id, "slices": slices})
        error = await down.error(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 0}]})
        assert error["extensions"]["code"] == "STORAGE_UNAVAILABLE"
        await down.data(DELETE_GROUP, {"id": group_id})

    database_down = base_settings(
        database_url=f"postgresql+asyncpg://nobody@127.0.0.1:{_closed_port()}/none",
        var_dir=tmp_path,
    )
    async with (
        serve(database_down) as (_, base_url),
        httpx.AsyncClient(base_url=base_url) as client,
    ):
        refused = await client.post(
            "/graphql",
            json={"query": "{ me { user } }"},
            headers={"Authorization": "Bearer pmk_some-token"},
        )
        assert refused.status_code == 500
        assert (await client.get("/readyz")).status_code == 503
    after = await scrape(stack)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("pacs_masks_storage_errors_total", where="completeMaskUpload") == 1
    assert moved("pacs_masks_storage_errors_total", where="deleteMaskGroup") == 1
    assert moved("pacs_masks_completion_failures_total", code="STORAGE_UNAVAILABLE") == 1
    assert moved("pacs_masks_database_errors_total", where="authentication") == 1
    assert moved("pacs_masks_database_errors_total", where="readyz") == 1
