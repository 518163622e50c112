"""Test stacks built from real parts: the app served by uvicorn on loopback, a database built by
`alembic upgrade head` (SQLite and PostgreSQL), and real storage (local disk, SeaweedFS's S3).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import asyncpg
import httpx
import pytest
import uvicorn
from sqlalchemy import delete, event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.audit import Actor
from app.config import Settings
from app.db import create_engine, create_sessionmaker, transaction, upgrade_database
from app.main import create_app, uvicorn_options
from app.models import Annotation, StorageDeletion, utcnow
from app.principals import Principal, Role
from app.state import Services
from app.storage import Storage
from app.tokens import create_token

pytest_plugins = ["storage_servers", "pacs_server", "pacs_flows"]

if TYPE_CHECKING:
    from storage_servers import SeaweedServer

IS_CI = os.environ.get("CI") == "true"
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def unavailable(reason: str) -> NoReturn:
    if IS_CI:
        pytest.fail(f"{reason} (required under CI=true)", pytrace=False)
    pytest.skip(reason)


def png_bytes(seed: int = 0, size: int = 64) -> bytes:
    """A small body that starts like a PNG; storage never decodes it."""
    return b"\x89PNG\r\n\x1a\n" + hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)


def content_md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


# --- databases -------------------------------------------------------------------------------


def _postgres_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
async def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
    # Alembic runs its own event loop, so it gets a thread of its own.
    await asyncio.to_thread(upgrade_database, url)
    return url


@pytest.fixture
async def own_sqlite_url(tmp_path: Path) -> str:
    """A database of the test's own, for a server it starts with special settings: what it
    writes cannot leak into the shared stacks."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'own.db'}"
    await asyncio.to_thread(upgrade_database, url)
    return url


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    if not _postgres_answers() and "TEST_DATABASE_URL" not in os.environ:
        unavailable("PostgreSQL does not answer on 127.0.0.1:5432")
    name = f"pacs_masks_test_{uuid.uuid4().hex[:12]}"
    admin = POSTGRES_ADMIN_URL

    async def admin_execute(sql: str) -> None:
        connection = await asyncpg.connect(admin)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    try:
        await admin_execute(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError) as error:
        unavailable(f"cannot create a PostgreSQL test database: {error}")
    base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    url = f"{base}/{name}"
    await asyncio.to_thread(upgrade_database, url)
    yield url
    await admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url".replace("postgresql", "postgres"))
    return url


# --- served stacks ---------------------------------------------------------------------------


@dataclass
class Stack:
    name: str
    settings: Settings
    services: Services
    base_url: str
    client: httpx.AsyncClient
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    storage: Storage
    # For presigned storage URLs: no API token may travel to storage.
    storage_client: httpx.AsyncClient
    # Bearer tokens by role name: reader, uploader, other (a second uploader), admin.
    tokens: dict[str, str] = field(default_factory=dict)

    async def gql(
        self, query: str, variables: dict[str, Any] | None = None, *, as_: str = "uploader"
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[as_]}"} if as_ in self.tokens else {}
        response = await self.client.post(
            "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def data(
        self, query: str, variables: dict[str, Any] | None = None, *, as_: str = "uploader"
    ) -> dict[str, Any]:
        body = await self.gql(query, variables, as_=as_)
        assert "errors" not in body, body["errors"]
        data: dict[str, Any] = body["data"]
        return data

    async def error(
        self, query: str, variables: dict[str, Any] | None = None, *, as_: str = "uploader"
    ) -> dict[str, Any]:
        body = await self.gql(query, variables, as_=as_)
        assert body.get("errors"), body
        error: dict[str, Any] = body["errors"][0]
        return error

    def auth(self, as_: str = "uploader") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[as_]}"}


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serve(
    settings: Settings, *, public_base_url: str | None = None
) -> AsyncIterator[tuple[Services, str]]:
    """Runs the app under uvicorn on a free loopback port; yields its services and base URL.
    `public_base_url` puts something in front of it (a proxy) in the URLs it signs."""
    sock = _free_socket()
    port = sock.getsockname()[1]
    own_url = f"http://127.0.0.1:{port}"
    settings = settings.model_copy(
        update={"host": "127.0.0.1", "port": port, "public_base_url": public_base_url or own_url}
    )
    app = create_app(settings)
    # The server keeps idle connections longer than httpx's pool does (5 s): otherwise a
    # request sent on a connection the server is closing at that moment fails with ReadError.
    config = uvicorn.Config(
        app,
        log_config=None,
        lifespan="on",
        access_log=False,
        timeout_keep_alive=30,
        **uvicorn_options(settings),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server stopped while starting")
        await asyncio.sleep(0.01)
    # What the lifespan built, as every request sees it: uvicorn keeps the lifespan state.
    services = server.lifespan.state["services"]
    assert isinstance(services, Services)
    try:
        yield services, own_url
    finally:
        server.should_exit = True
        await task
        sock.close()


def base_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,
        "cors_origins": [],
        "allowed_content_types": ["image/png"],
        # Tests run the sweeper themselves, at the moments they choose.
        "cleanup_enabled": False,
        # ... and validate groups themselves too.
        "validation_enabled": False,
        # Only the PACS tests have exports to run (their stack switches the job on).
        "dicom_export_enabled": False,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def open_stack(
    name: str, settings: Settings, *, ensure_bucket: bool = True, public_base_url: str | None = None
) -> AsyncIterator[Stack]:
    async with serve(settings, public_base_url=public_base_url) as (services, base_url):
        settings = services.settings
        engine = create_engine(settings.resolved_database_url)
        storage = services.storage
        if ensure_bucket:
            await storage.ensure_bucket([])
        sessionmaker = create_sessionmaker(engine)
        tokens = await make_tokens(sessionmaker)
        async with (
            httpx.AsyncClient(
                base_url=base_url, timeout=60, headers=auth_header(tokens["uploader"])
            ) as client,
            httpx.AsyncClient(timeout=60) as storage_client,
        ):
            stack = Stack(
                name=name,
                settings=settings,
                services=services,
                base_url=base_url,
                client=client,
                engine=engine,
                sessionmaker=sessionmaker,
                storage=storage,
                tokens=tokens,
                storage_client=storage_client,
            )
            try:
                yield stack
            finally:
                await engine.dispose()


def auth_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


TEST_USERS = {
    "reader": ("reader-1", Role.READER),
    "uploader": ("uploader-1", Role.UPLOADER),
    "other": ("uploader-2", Role.UPLOADER),
    "admin": ("admin-1", Role.ADMIN),
}


async def make_tokens(sessionmaker: async_sessionmaker[AsyncSession]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    actor = Actor(Principal("test-setup", Role.ADMIN))
    async with transaction(sessionmaker) as session:
        for name, (user, role) in TEST_USERS.items():
            _, tokens[name] = await create_token(
                session, actor, user=user, role=role, expires_in=None, now=utcnow()
            )
    return tokens


@pytest.fixture(scope="session")
async def sqlite_local_stack(
    sqlite_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    var_dir = tmp_path_factory.mktemp("var")
    settings = base_settings(database_url=sqlite_url, var_dir=var_dir, storage_provider="local")
    async with open_stack("sqlite-local", settings) as stack:
        yield stack


@pytest.fixture(scope="session")
async def postgres_s3_stack(
    postgres_url: str, seaweed_server: SeaweedServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """The main S3 stack: SeaweedFS checks signatures, expiry and Content-MD5 as S3 does."""
    from storage_servers import s3_settings

    bucket = f"pacs-masks-{secrets.token_hex(4)}"
    storage_settings = s3_settings(
        seaweed_server.endpoint_url, seaweed_server.access_key, seaweed_server.secret_key, bucket
    )
    settings = storage_settings.model_copy(
        update={"database_url": postgres_url, "var_dir": tmp_path_factory.mktemp("var")}
    )
    async with open_stack("postgresql-s3", settings) as stack:
        yield stack


@pytest.fixture(params=["sqlite-local", "postgresql-s3"])
def served_stack(request: pytest.FixtureRequest) -> Stack:
    # Only the stack a test is parametrised with gets started (lazily, once per session).
    fixture = "sqlite_local_stack" if request.param == "sqlite-local" else "postgres_s3_stack"
    current: Stack = request.getfixturevalue(fixture)
    return current


@pytest.fixture
async def stack(served_stack: Stack) -> AsyncIterator[Stack]:
    try:
        yield served_stack
    finally:
        await reset(served_stack)


async def reset(stack: Stack) -> None:
    """Each test leaves no trace: rows and stored objects go."""
    await stack.storage.delete_prefix("mask/")
    async with stack.sessionmaker() as session, session.begin():
        await session.execute(delete(StorageDeletion))
        # Groups, masks and pending uploads follow by ON DELETE CASCADE.
        await session.execute(delete(Annotation))


@contextlib.contextmanager
def count_statements(engine: AsyncEngine) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # Transaction control (SQLite's explicit BEGIN) is not a query, and the background
        # jobs' statements (app.jobs names their tasks "job:...") are not the caller's: a
        # validation woken by the seeding uploads may land in the middle of a count.
        task = asyncio.current_task()
        if task is not None and task.get_name().startswith("job:"):
            return
        if not statement.lstrip().upper().startswith("BEGIN"):
            statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
