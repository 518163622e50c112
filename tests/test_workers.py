"""`pacs-masks serve --workers 2` on PostgreSQL and SeaweedFS, as an operator runs it: the
start-up work happens once, /metrics adds up what every worker counted, a subscriber on one
worker sees changes made through the other, and the background jobs run once per group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from commands import ServedProcess, clean_env, run_cli, served
from conftest import Stack, make_tokens
from flows import create_annotation, create_group, upload
from sqlalchemy import func, select
from test_events import LiveClient, live
from test_metrics import parse, value
from test_validation_job import png

from app.config import Settings
from app.db import create_engine, create_sessionmaker
from app.main import open_storage
from app.models import JobRun, MaskGroupValidation

if TYPE_CHECKING:
    from storage_servers import SeaweedServer

pytestmark = [pytest.mark.postgres, pytest.mark.s3]

WORKERS = 2
METRICS_TOKEN = "workers-scrape-token-0123456789"
# Bounds on how many probes it takes to reach every worker: the kernel hands each new
# connection to whichever worker accepts first, so a few rounds are enough in practice.
PROBE_ROUNDS = 25
# How long a test waits for what a background job publishes.
JOB_WAIT_SECONDS = 60
PROBES_PER_ROUND = 8


@pytest.fixture(scope="module")
def settings(
    postgres_url: str, seaweed_server: SeaweedServer, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    from storage_servers import s3_settings

    bucket = f"pacs-masks-{secrets.token_hex(4)}"
    storage = s3_settings(
        seaweed_server.endpoint_url, seaweed_server.access_key, seaweed_server.secret_key, bucket
    )
    return storage.model_copy(
        update={"database_url": postgres_url, "var_dir": tmp_path_factory.mktemp("var")}
    )


def _environment(settings: Settings) -> dict[str, str]:
    assert settings.aws_access_key_id
    assert settings.aws_secret_access_key
    assert settings.s3_endpoint_url
    return clean_env(
        DATABASE_URL=settings.database_url,
        STORAGE_PROVIDER="s3",
        S3_BUCKET_NAME=settings.s3_bucket_name,
        S3_ENDPOINT_URL=settings.s3_endpoint_url,
        S3_FORCE_PATH_STYLE="true",
        AWS_ACCESS_KEY_ID=settings.aws_access_key_id,
        AWS_SECRET_ACCESS_KEY=settings.aws_secret_access_key,
        METRICS_TOKEN=METRICS_TOKEN,
        # The one job the tests watch, often; the sweeper and exports stay off.
        VALIDATION_ENABLED="true",
        VALIDATION_INTERVAL_SECONDS="0.5",
        CLEANUP_ENABLED="false",
        DICOM_EXPORT_ENABLED="false",
    )


@pytest.fixture(scope="module")
def server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    cwd = tmp_path_factory.mktemp("serve")
    env = _environment(settings)
    setup = run_cli(cwd, env, "setup-storage")
    assert setup.returncode == 0, setup.stderr
    with served(cwd, env, workers=WORKERS) as process:
        yield process


@pytest.fixture
async def stack(settings: Settings, server: ServedProcess) -> AsyncIterator[Stack]:
    """The flows' view of the served process: its URL, tokens, storage for presigned PUTs."""
    engine = create_engine(settings.resolved_database_url)
    sessionmaker = create_sessionmaker(engine)
    storage = await open_storage(settings)
    tokens = await make_tokens(sessionmaker)
    try:
        async with (
            httpx.AsyncClient(
                base_url=server.base_url,
                timeout=60,
                headers={"Authorization": f"Bearer {tokens['uploader']}"},
            ) as client,
            httpx.AsyncClient(timeout=60) as storage_client,
        ):
            yield Stack(
                name="workers",
                settings=settings,
                services=None,  # type: ignore[arg-type]  # in the server's processes
                base_url=server.base_url,
                client=client,
                engine=engine,
                sessionmaker=sessionmaker,
                storage=storage,
                storage_client=storage_client,
                tokens=tokens,
            )
    finally:
        await storage.aclose()
        await engine.dispose()


async def scrape(server: ServedProcess) -> dict[Any, float]:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
        )
    assert response.status_code == 200, response.text
    return parse(response.text)


def access_lines(server: ServedProcess, route: str) -> list[dict[str, Any]]:
    return [
        line
        for line in server.log_lines()
        if line.get("logger") == "app.access" and line.get("route") == route
    ]


async def _probe(base_url: str, request_id: str) -> None:
    # A client of its own: a new connection, which any worker may accept.
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{base_url}/healthz", headers={"X-Request-ID": request_id})
    assert response.status_code == 200


def test_start_up_work_ran_once_in_the_parent(server: ServedProcess) -> None:
    printed = server.stdout.read_text()
    assert printed.count("pacs-masks: viewer at") == 1
    lines = server.log_lines()
    parents = {line["pid"] for line in lines if line["message"].startswith("Started parent")}
    assert len(parents) == 1
    assert len(server.worker_pids) == WORKERS
    assert parents.isdisjoint(server.worker_pids)


async def test_metrics_add_up_what_every_worker_counted(server: ServedProcess) -> None:
    # Requests until both workers have answered some: each logs its own with its pid.
    run = uuid.uuid4().hex[:8]
    sent = 0
    by_worker: Counter[int] = Counter()
    for _ in range(PROBE_ROUNDS):
        ids = [f"probe-{run}-{sent + index}" for index in range(PROBES_PER_ROUND)]
        await asyncio.gather(*(_probe(server.base_url, request_id) for request_id in ids))
        sent += len(ids)
        await _logged(server, lambda: _probe_lines(server, run), sent)
        by_worker = Counter(line["pid"] for line in _probe_lines(server, run))
        if len(by_worker) == WORKERS:
            break
    assert set(by_worker) == server.worker_pids, by_worker

    # Whichever worker answers the scrape, the counter is the sum over the workers: every
    # /healthz the logs show, the start-up's polling included.
    logged = len([line for line in access_lines(server, "/healthz") if line["status"] == 200])
    samples = await scrape(server)
    counted = value(
        samples, "pacs_masks_http_requests_total", route="/healthz", method="GET", status="200"
    )
    assert counted == logged
    assert counted >= sent


def _probe_lines(server: ServedProcess, run: str) -> list[dict[str, Any]]:
    return [
        line
        for line in access_lines(server, "/healthz")
        if str(line.get("request_id", "")).startswith(f"probe-{run}-")
    ]


async def _logged(server: ServedProcess, lines: Any, count: int) -> None:
    """Waits until `count` lines are logged: a worker writes its access line just after the
    answer, which may reach the test first."""
    for _ in range(600):
        if len(lines()) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(lines())} lines logged, not {count}")


async def _subscribers_by_worker(server: ServedProcess) -> dict[str, float]:
    samples = await scrape(server)
    return {
        dict(labels)["pid"]: count
        for (name, labels), count in samples.items()
        if name == "pacs_masks_live_subscribers" and count
    }


async def _registered(server: ServedProcess, total: int) -> dict[str, float]:
    """Waits until the workers have registered `total` subscribers (the protocol has no
    'subscribed' message; the per-worker gauge says where each one is)."""
    for _ in range(600):
        by_worker = await _subscribers_by_worker(server)
        if sum(by_worker.values()) == total:
            return by_worker
        await asyncio.sleep(0.05)
    raise AssertionError(f"subscribers by worker: {by_worker}, not {total} in all")


async def test_a_subscriber_on_one_worker_sees_changes_made_through_another(
    stack: Stack, server: ServedProcess
) -> None:
    annotation_id = await create_annotation(stack)
    async with contextlib.AsyncExitStack() as sockets:
        clients: list[LiveClient] = []
        by_worker: dict[str, float] = {}
        # New connections, opened together, until both workers hold subscribers: then the
        # worker that commits the upload is, for some of them, not their own.
        for _ in range(PROBE_ROUNDS):
            opened = await asyncio.gather(
                *(
                    sockets.enter_async_context(live(server.base_url, stack.tokens["reader"]))
                    for _ in range(4)
                )
            )
            for client in opened:
                await client.subscribe(annotation_id)
            clients.extend(opened)
            by_worker = await _registered(server, len(clients))
            if len(by_worker) == WORKERS:
                break
        assert {int(pid) for pid in by_worker} == server.worker_pids, by_worker

        group_id = await create_group(stack, annotation_id, 2)
        await upload(stack, group_id, [0, 1], make_body=lambda _index: png())
        for client in clients:
            events = [await client.event(), await client.event()]
            try:
                # VALIDATED comes from a background job, which a loaded machine may delay.
                events.append(await client.event(timeout=JOB_WAIT_SECONDS))
            except TimeoutError as error:
                raise AssertionError(f"no VALIDATED; jobs: {await _job_runs(stack)}") from error
            assert [(event["kind"], event["status"]) for event in events] == [
                ("CREATED", "PENDING"),
                ("SLICES_COMPLETED", "COMPLETE"),
                ("VALIDATED", "COMPLETE"),
            ]

    # Both workers run the validation job; the lease on its run let one validate the group.
    async with stack.sessionmaker() as session:
        reports = await session.scalar(
            select(func.count())
            .select_from(MaskGroupValidation)
            .where(MaskGroupValidation.mask_group_id == int(group_id))
        )
    assert reports == 1


async def _job_runs(stack: Stack) -> list[tuple[Any, ...]]:
    """The job_run rows (who holds which lease, until when), for a failure's message."""
    async with stack.sessionmaker() as session:
        rows = (await session.execute(select(JobRun))).scalars()
        return [(r.name, r.locked_by, r.locked_until, r.next_run_at, r.last_error) for r in rows]


def _series_pids(samples: dict[Any, float], name: str) -> set[int]:
    return {int(dict(labels)["pid"]) for (sample, labels), _ in samples.items() if sample == name}


async def test_a_worker_that_dies_is_replaced_and_its_counts_stay(server: ServedProcess) -> None:
    before = await scrape(server)
    assert _series_pids(before, "pacs_masks_live_subscribers") == server.worker_pids
    healthz = {"route": "/healthz", "method": "GET", "status": "200"}
    counted = value(before, "pacs_masks_http_requests_total", **healthz)

    victim = min(server.worker_pids)
    os.kill(victim, signal.SIGKILL)
    started = {victim}
    for _ in range(1200):
        started = {
            line["pid"]
            for line in server.log_lines()
            if line["message"] == "Application startup complete."
        }
        if started - server.worker_pids:
            break
        await asyncio.sleep(0.1)
    [replacement] = started - server.worker_pids
    server.worker_pids.remove(victim)
    server.worker_pids.add(replacement)

    after = await scrape(server)
    # The dead worker's per-process gauge went; what it counted is still in the sum.
    assert _series_pids(after, "pacs_masks_live_subscribers") == server.worker_pids
    assert value(after, "pacs_masks_http_requests_total", **healthz) >= counted


def _environment_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


# Last: it stops the module's server.
def test_sigterm_stops_every_worker_and_removes_the_metrics_folder(
    server: ServedProcess,
) -> None:
    # The workers' samples are in a folder of this run's own, given to them by the parent.
    [folder] = {_environment_of(pid)["PROMETHEUS_MULTIPROC_DIR"] for pid in server.worker_pids}
    assert list(Path(folder).glob("*.db"))
    server.process.terminate()
    assert server.process.wait(timeout=60) == 0
    messages = [line["message"] for line in server.log_lines()]
    for pid in server.worker_pids:
        # Each worker shut down as one process does: its lifespan closed its resources.
        assert f"Finished server process [{pid}]" in messages
        assert not Path(f"/proc/{pid}").exists()
    assert not Path(folder).exists()
