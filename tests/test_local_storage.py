from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import AsyncIterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from app.config import Settings
from app.local_storage import ROUTE_METHODS, ROUTE_PATH, LocalStorage
from app.storage import SignedRequest, StorageError, mask_key

BASE_URL = "http://masks.test"
BODY = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
KEY = mask_key(1, 2, 7, None, "image/png")


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def make_settings(var_dir: Path, **overrides: Any) -> Settings:
    return Settings(_env_file=None, var_dir=var_dir, public_base_url=BASE_URL, **overrides)


def all_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir())


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "var")


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    return LocalStorage.from_settings(settings)


@pytest.fixture
def root(settings: Settings) -> Path:
    return settings.resolved_local_storage_dir


def serving(storage: LocalStorage) -> Starlette:
    """The backend's own route, as app.main mounts it."""
    return Starlette(routes=[Route(ROUTE_PATH, storage.handle, methods=ROUTE_METHODS)])


@pytest.fixture
def app(storage: LocalStorage) -> Starlette:
    return serving(storage)


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


def presign_put(
    storage: LocalStorage,
    key: str = KEY,
    body: bytes = BODY,
    *,
    expires_in: int = 600,
    now: datetime | None = None,
) -> SignedRequest:
    return storage.presign_put(
        key,
        content_type="image/png",
        content_md5=md5_b64(body),
        content_length=len(body),
        expires_in=expires_in,
        now=now or datetime.now(UTC),
    )


async def put(
    client: httpx.AsyncClient,
    signed: SignedRequest,
    body: Any = BODY,
    **header_overrides: str,
) -> httpx.Response:
    headers = dict(signed.headers) | header_overrides
    return await client.request(signed.method, signed.url, content=body, headers=headers)


async def upload(storage: LocalStorage, client: httpx.AsyncClient, key: str, body: bytes) -> None:
    response = await put(client, presign_put(storage, key, body), body)
    assert response.status_code == 200, response.text


async def test_put_get_round_trip(
    storage: LocalStorage, client: httpx.AsyncClient, root: Path
) -> None:
    signed = presign_put(storage)
    assert signed.method == "PUT"
    assert signed.url.startswith(f"{BASE_URL}/storage/{KEY}?")
    assert dict(signed.headers) == {"Content-Type": "image/png", "Content-MD5": md5_b64(BODY)}
    etag = f'"{hashlib.md5(BODY).hexdigest()}"'

    response = await put(client, signed)
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == etag
    assert (root / KEY).read_bytes() == BODY
    assert stat.S_IMODE(root.stat().st_mode) == 0o700

    get = storage.presign_get(KEY, expires_in=60, now=datetime.now(UTC))
    assert get.method == "GET"
    assert get.headers == ()
    response = await client.get(get.url)
    assert response.status_code == 200
    assert response.content == BODY
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-length"] == str(len(BODY))
    assert response.headers["etag"] == etag

    response = await client.head(get.url)
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(len(BODY))
    assert response.headers["etag"] == etag

    stream = await storage.open(KEY)
    assert stream is not None
    assert (stream.size, stream.etag, stream.content_type) == (len(BODY), etag, "image/png")
    assert b"".join([chunk async for chunk in stream.chunks]) == BODY


async def test_large_body_is_streamed_in_batches(
    storage: LocalStorage, client: httpx.AsyncClient, root: Path
) -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start : start + 100_000]

    signed = presign_put(storage, body=body)
    response = await put(client, signed, chunks(), **{"Content-Length": str(len(body))})
    assert response.status_code == 200, response.text
    assert (root / KEY).read_bytes() == body
    assert all_files(root) == [f"mask/1/2/.{Path(KEY).name}.meta", KEY]

    get = storage.presign_get(KEY, expires_in=60, now=datetime.now(UTC))
    response = await client.get(get.url)
    assert response.content == body


async def test_overwrite_replaces_content_and_metadata(
    storage: LocalStorage, client: httpx.AsyncClient
) -> None:
    await upload(storage, client, KEY, BODY)
    await upload(storage, client, KEY, b"second")
    found = await storage.stat_objects([KEY])
    assert found[KEY].size == 6
    assert found[KEY].md5_hex == hashlib.md5(b"second").hexdigest()


async def test_stat_objects(storage: LocalStorage, client: httpx.AsyncClient, root: Path) -> None:
    keys = [mask_key(1, 2, index, None, "image/png") for index in range(3)]
    bodies = [BODY, b"", BODY * 2]
    for key, body in zip(keys, bodies, strict=True):
        await upload(storage, client, key, body)
    # An upload in progress must stay invisible.
    (root / "mask/1/2/.slice_00009.png.abcd.part").write_bytes(b"partial")
    missing = [mask_key(1, 2, 9, None, "image/png"), mask_key(1, 2, 4, "liver", "image/png")]

    found = await storage.stat_objects([*keys, *missing])
    assert sorted(found) == sorted(keys)
    for key, body in zip(keys, bodies, strict=True):
        assert found[key].key == key
        assert found[key].size == len(body)
        assert found[key].md5_hex == hashlib.md5(body).hexdigest()

    # Without a sidecar, or with one describing another file, the MD5 comes from the content.
    (root / "mask/1/2/.slice_00000.png.meta").unlink()
    (root / keys[1]).write_bytes(b"changed behind our back")
    found = await storage.stat_objects(keys)
    assert found[keys[0]].md5_hex == hashlib.md5(BODY).hexdigest()
    assert found[keys[1]].md5_hex == hashlib.md5(b"changed behind our back").hexdigest()

    assert await storage.stat_objects([mask_key(5, 6, 0, None, "image/png")]) == {}
    with pytest.raises(ValueError, match="invalid storage key"):
        await storage.stat_objects(["mask/../x"])


async def test_expired_url_is_refused_and_a_reissued_one_works(
    storage: LocalStorage, client: httpx.AsyncClient, root: Path
) -> None:
    old = datetime.now(UTC) - timedelta(seconds=700)
    response = await put(client, presign_put(storage, now=old))
    assert response.status_code == 403
    assert "expired" in response.text
    assert all_files(root) == []

    response = await client.get(storage.presign_get(KEY, expires_in=600, now=old).url)
    assert response.status_code == 403
    assert "expired" in response.text

    response = await put(client, presign_put(storage))
    assert response.status_code == 200
    response = await client.get(storage.presign_get(KEY, expires_in=600, now=datetime.now(UTC)).url)
    assert response.status_code == 200
    assert response.content == BODY


def _tampered(url: str, name: str, value: str) -> str:
    parsed = httpx.URL(url)
    return str(parsed.copy_set_param(name, value))


async def test_tampered_urls_are_refused(
    storage: LocalStorage, client: httpx.AsyncClient, root: Path
) -> None:
    signed = presign_put(storage)
    url = httpx.URL(signed.url)
    signature = url.params["signature"]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    other_key = mask_key(1, 2, 8, None, "image/png")
    urls = [
        _tampered(signed.url, "signature", flipped),
        _tampered(signed.url, "signature", ""),
        str(url.copy_remove_param("signature")),
        str(url.copy_remove_param("expires")),
        _tampered(signed.url, "expires", str(int(url.params["expires"]) + 3600)),
        _tampered(signed.url, "length", str(len(BODY) + 1)),
        signed.url.replace(KEY, other_key),
        _tampered(signed.url, "signature", "é" * 64),
    ]
    for tampered in urls:
        response = await client.put(tampered, content=BODY, headers=dict(signed.headers))
        assert response.status_code == 403, tampered
        assert "SignatureDoesNotMatch" in response.text
    assert all_files(root) == []

    # A GET URL does not authorise a PUT, nor the reverse.
    get = storage.presign_get(KEY, expires_in=60, now=datetime.now(UTC))
    response = await client.put(get.url, content=BODY, headers=dict(signed.headers))
    assert response.status_code == 403
    await upload(storage, client, KEY, BODY)
    response = await client.get(signed.url)
    assert response.status_code == 403
    response = await client.get(_tampered(get.url, "signature", flipped))
    assert response.status_code == 403


async def test_signed_headers_must_match(
    storage: LocalStorage, client: httpx.AsyncClient, root: Path
) -> None:
    signed = presign_put(storage)
    for overrides in (
        {"Content-Type": "image/webp"},
        {"Content-Type": "image/png; charset=utf-8"},
        {"Content-MD5": md5_b64(b"something else")},
    ):
        response = await put(client, signed, **overrides)
        assert response.status_code == 403, overrides
    response = await client.put(signed.url, content=BODY, headers={"Content-Type": "image/png"})
    assert response.status_code == 403
    assert all_files(root) == []


async def test_body_with_other_md5_is_refused(
    storage: LocalStorage, client: httpx.AsyncClient, root: Path
) -> None:
    other = bytes(reversed(BODY))
    signed = presign_put(storage, body=other)
    response = await put(client, signed, BODY)
    assert response.status_code == 400
    assert "BadDigest" in response.text
    assert all_files(root) == []


async def test_body_length_must_match(
    storage: LocalStorage, client: httpx.AsyncClient, root: Path
) -> None:
    signed = presign_put(storage)
    declared = {"Content-Length": str(len(BODY))}
    # Longer and shorter bodies than the (signed) Content-Length the client sends.
    for body, code in ((BODY + b"x", "EntityTooLarge"), (BODY[:-1], "IncompleteBody")):
        response = await put(client, signed, body, **declared)
        assert response.status_code == 400, len(body)
        assert code in response.text
        assert all_files(root) == []

    # A Content-Length other than the signed one.
    for length in (len(BODY) - 1, len(BODY) + 1):
        response = await put(client, signed, BODY[:length], **{"Content-Length": str(length)})
        assert response.status_code == 400

    async def chunked() -> AsyncIterator[bytes]:
        yield BODY

    response = await put(client, signed, chunked())
    assert response.status_code == 411
    assert all_files(root) == []


async def test_size_limit(tmp_path: Path) -> None:
    storage = LocalStorage.from_settings(make_settings(tmp_path, max_mask_size_bytes=100))
    app = serving(storage)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        response = await put(client, presign_put(storage))
    assert response.status_code == 400
    assert "EntityTooLarge" in response.text


async def _raw_request(app: Starlette, method: str, path: str, query: str = "") -> int:
    """Sends a path as is; httpx would collapse literal dot segments before we saw them."""
    sent: list[MutableMapping[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"masks.test"), (b"content-length", b"4")],
        "server": ("masks.test", 80),
        "client": ("127.0.0.1", 1234),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"evil", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"])


async def test_path_traversal_is_refused(
    storage: LocalStorage, client: httpx.AsyncClient, app: Starlette, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"root")
    before = all_files(tmp_path)

    bad_keys = [
        "mask/../../outside/passwd",
        "mask/../../../etc/passwd",
        "/etc/passwd",
        "mask//x.png",
        "mask/.x.png",
        "mask/1/2/.slice_00007.png.meta",
        "mask\\..\\..\\outside\\passwd",
        "other/x.png",
        "mask",
        "mask/",
    ]
    for key in bad_keys:
        with pytest.raises(ValueError, match="invalid storage key"):
            presign_put(storage, key)
        with pytest.raises(ValueError, match="invalid storage key"):
            await storage.open(key)
        # Even a valid signature over such a key gets nowhere.
        expires = int(datetime.now(UTC).timestamp()) + 600
        signature = storage._sign(f"GET\n{key}\n{expires}")
        query = f"expires={expires}&signature={signature}"
        for method in ("GET", "PUT", "HEAD"):
            status = await _raw_request(app, method, "/storage/" + key, query)
            assert status == 400, (method, key)

    encoded = [
        "/storage/mask/%2e%2e/%2e%2e/outside/passwd",
        "/storage/mask/%2E%2E%2F%2E%2E%2Foutside%2Fpasswd",
        "/storage/%2Fetc%2Fpasswd",
        "/storage//etc/passwd",
        "/storage/mask/..%5C..%5Coutside%5Cpasswd",
        "/storage/mask/%00.png",
    ]
    for path in encoded:
        for method in ("GET", "PUT"):
            response = await client.request(method, BASE_URL + path + "?expires=9999999999")
            assert response.status_code in (400, 403), path
            assert str(root) not in response.text
            assert str(tmp_path) not in response.text

    assert all_files(tmp_path) == before
    assert all_files(root) == []


async def test_symlink_out_of_root_is_refused(
    storage: LocalStorage, client: httpx.AsyncClient, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    (outside / "2").mkdir(parents=True)
    (outside / "2" / "slice_00007.png").write_bytes(b"secret")
    (root / "mask").mkdir()
    (root / "mask" / "1").symlink_to(outside)
    before = all_files(outside)

    response = await put(client, presign_put(storage))
    assert response.status_code == 403
    assert str(outside) not in response.text
    response = await client.get(storage.presign_get(KEY, expires_in=60, now=datetime.now(UTC)).url)
    assert response.status_code == 403
    with pytest.raises(PermissionError):
        await storage.open(KEY)
    with pytest.raises(StorageError):
        await storage.stat_objects([KEY])
    with pytest.raises(StorageError):
        await storage.delete_prefix("mask/1/2/")
    assert all_files(outside) == before


async def test_secret_is_persisted_across_instances(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    first = LocalStorage.from_settings(make_settings(var_dir))
    secret_file = var_dir / "storage-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_bytes()
    signed = presign_put(first)

    second = LocalStorage.from_settings(make_settings(var_dir))
    assert secret_file.read_bytes() == secret
    transport = httpx.ASGITransport(app=serving(second))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        response = await put(client, signed)
        assert response.status_code == 200
        get = first.presign_get(KEY, expires_in=60, now=datetime.now(UTC))
        assert (await client.get(get.url)).content == BODY

    # Another var dir means another secret.
    stranger = LocalStorage.from_settings(make_settings(tmp_path / "other"))
    transport = httpx.ASGITransport(app=serving(stranger))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        assert (await put(client, signed)).status_code == 403


async def test_configured_secret_is_used(tmp_path: Path) -> None:
    secret = "s" * 40
    first = LocalStorage.from_settings(make_settings(tmp_path / "a", local_storage_secret=secret))
    second = LocalStorage.from_settings(make_settings(tmp_path / "b", local_storage_secret=secret))
    assert not (tmp_path / "a" / "storage-secret").exists()
    transport = httpx.ASGITransport(app=serving(second))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        assert (await put(client, presign_put(first))).status_code == 200


async def test_delete_prefix(storage: LocalStorage, client: httpx.AsyncClient, root: Path) -> None:
    group = [
        mask_key(1, 2, index, label, "image/png") for index in range(2) for label in (None, "a")
    ]
    kept = mask_key(1, 3, 0, None, "image/png")
    for key in [*group, kept]:
        await upload(storage, client, key, BODY)
    (root / "mask/1/2/.slice_00005.png.abcd.part").write_bytes(b"partial")

    assert await storage.delete_prefix("mask/1/2/") == len(group)
    assert not (root / "mask/1/2").exists()
    assert await storage.stat_objects(group) == {}
    assert all_files(root) == [f"mask/1/3/.{Path(kept).name}.meta", kept]
    assert await storage.delete_prefix("mask/1/2/") == 0

    assert await storage.delete_prefix("mask/1/") == 1
    assert all_files(root) == []
    assert not (root / "mask").exists()
    assert root.is_dir()

    for prefix in ("", "/", "../", "mask/../", "mask/1/../../", "/etc/", "mask//", "other/"):
        with pytest.raises(ValueError, match="invalid storage prefix"):
            await storage.delete_prefix(prefix)


async def test_delete_prefix_within_a_folder(
    storage: LocalStorage, client: httpx.AsyncClient, root: Path
) -> None:
    for index in (1, 2, 10):
        await upload(storage, client, mask_key(1, 2, index, None, "image/png"), BODY)
    assert await storage.delete_prefix("mask/1/2/slice_0000") == 2
    assert all_files(root) == ["mask/1/2/.slice_00010.png.meta", "mask/1/2/slice_00010.png"]


async def test_open_and_get_of_missing_key(
    storage: LocalStorage, client: httpx.AsyncClient
) -> None:
    assert await storage.open(KEY) is None
    get = storage.presign_get(KEY, expires_in=60, now=datetime.now(UTC))
    assert (await client.get(get.url)).status_code == 404
    assert (await client.head(get.url)).status_code == 404


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_unread_stream_does_not_leak(
    storage: LocalStorage, client: httpx.AsyncClient
) -> None:
    await upload(storage, client, KEY, BODY)
    descriptors = len(os.listdir("/proc/self/fd"))
    stream = await storage.open(KEY)
    assert stream is not None
    assert len(os.listdir("/proc/self/fd")) == descriptors + 1
    del stream
    assert len(os.listdir("/proc/self/fd")) == descriptors


async def test_ensure_bucket_creates_root(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, local_storage_dir=tmp_path / "objects")
    storage = LocalStorage.from_settings(settings)
    (tmp_path / "objects").rmdir()
    await storage.ensure_bucket(["http://viewer.test"])
    assert (tmp_path / "objects").is_dir()
    await storage.aclose()


def test_presigned_urls() -> None:
    now = datetime(2030, 1, 2, 3, 4, 5, 600_000, tzinfo=UTC)
    storage = LocalStorage(Path("/nonexistent"), b"k" * 32, BASE_URL + "/storage/", 1000)
    signed = presign_put(storage, now=now, expires_in=60)
    assert signed.expires_at == now + timedelta(seconds=60)
    url = httpx.URL(signed.url)
    assert url.path == f"/storage/{KEY}"
    assert url.params["expires"] == str(int(now.timestamp()) + 60)
    assert url.params["length"] == str(len(BODY))
    assert len(url.params["signature"]) == 64
    # Deterministic: the same inputs sign the same URL.
    assert presign_put(storage, now=now, expires_in=60) == signed
    get = storage.presign_get(KEY, expires_in=60, now=now)
    assert get.url.startswith(f"{BASE_URL}/storage/{KEY}?expires=")
    assert "length=" not in get.url
