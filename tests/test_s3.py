from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
import socket
import string
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from unittest import mock

import botocore.session
import httpx
import pytest
from botocore.config import Config
from hypothesis import given
from hypothesis import strategies as st
from storage_servers import BUCKET, MotoServer, RcloneServer, presigned_put, s3_settings

from app.config import CONTENT_TYPE_EXTENSIONS, Settings
from app.s3 import S3Storage
from app.sigv4 import Credentials, Presigner
from app.storage import (
    MAX_SIGNING_STEP_SECONDS,
    StorageError,
    group_prefix,
    mask_key,
    signing_time,
)

# A 1x1 transparent PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
VIEWER_ORIGIN = "http://localhost:5173"


def md5_b64(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


def md5_hex(body: bytes) -> str:
    return hashlib.md5(body).hexdigest()


# Spaced out so the neighbouring groups some tests fill are nobody else's.
_group_ids = iter(range(1000, 1_000_000, 10))


def new_group() -> tuple[int, int]:
    """A fresh (annotation, group) so tests sharing a bucket never see each other's keys."""
    return 7, next(_group_ids)


@contextmanager
def recorded_params(storage: S3Storage, operation: str) -> Iterator[list[dict[str, Any]]]:
    """The parameters of every `operation` call the storage's client makes meanwhile."""
    calls: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        calls.append(dict(params))

    event = f"before-parameter-build.s3.{operation}"
    storage.client.meta.events.register(event, record)
    try:
        yield calls
    finally:
        storage.client.meta.events.unregister(event, record)


# --- presigned URLs are botocore's, byte for byte ---------------------------------------------

_LABEL_CHARS = string.ascii_letters + string.digits + "_-"
_AWKWARD_KEYS = [
    "mask/1/2/with space+plus&amp=eq?q#h%25.png",
    "mask/1/2/ünïcødé/ファイル.png",
    "mask/1/2/~tilde!*'()$,;:@[]{}.png",
    "mask//double//slash.png",
    "mask/./dot/../segments.png",
    "mask/1/2/trailing/",
    "mask/1/2/ leading and trailing space ",
    'mask/1/2/tab\tand\\backslash|pipe"quote<>^`.png',
    "/leading/slash.png",
    "..",
    "mask/1/2/100%.png",
]
_CONTENT_TYPES = [*CONTENT_TYPE_EXTENSIONS, "image/png; charset=binary", "text/plain;  a=b "]


def _random_key(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(_AWKWARD_KEYS)
    label = None
    if rng.random() < 0.7:
        label = rng.choice(string.ascii_letters) + "".join(
            rng.choice(_LABEL_CHARS) for _ in range(rng.randint(0, 20))
        )
    return mask_key(
        rng.randint(1, 10**9),
        rng.randint(1, 10**9),
        rng.randint(0, 99_999),
        label,
        rng.choice(list(CONTENT_TYPE_EXTENSIONS)),
    )


def _random_now(rng: random.Random) -> datetime:
    moment = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(
        seconds=rng.randint(0, 10 * 365 * 86400), microseconds=rng.randint(0, 999_999)
    )
    if rng.random() < 0.3:
        # Callers may pass any aware datetime; the signature is over UTC.
        return moment.astimezone(timezone(timedelta(hours=rng.randint(-11, 13), minutes=30)))
    return moment


def _signing_batches(rng: random.Random) -> Iterator[tuple[str, datetime, int]]:
    """150 (key, now, expires_in): batches of 1 to 8 keys share `now` and `expires_in`, as
    the URLs of one request do (the presigner keeps what they make of a URL between calls)."""
    signed = 0
    while signed < 150:
        now = _random_now(rng)
        expires_in = rng.choice([1, 60, 600, 3600, 86400, 604800, rng.randint(1, 604800)])
        for _ in range(rng.randint(1, 8)):
            yield _random_key(rng), now, expires_in
            signed += 1


_PRESIGN_CONFIGS = [
    pytest.param({"s3_endpoint_url": "http://127.0.0.1:9000"}, id="path-ip"),
    pytest.param(
        {
            "s3_region": "eu-central-1",
            "s3_endpoint_url": "http://minio:9000",
            "s3_public_endpoint_url": "https://Files.Example.com:8443/s3/",
        },
        id="path-public-endpoint-with-path",
    ),
    pytest.param(
        {"s3_endpoint_url": "https://minio.example.com:443", "storage_provider": "minio"},
        id="path-default-port",
    ),
    pytest.param({"s3_region": "eu-west-1"}, id="aws-virtual"),
    pytest.param({"s3_region": "us-east-1"}, id="aws-virtual-us-east-1"),
    pytest.param({"s3_region": "ap-southeast-2", "s3_force_path_style": True}, id="aws-path"),
    pytest.param({"s3_region": "cn-north-1"}, id="aws-cn-virtual"),
    pytest.param(
        {
            "s3_endpoint_url": "http://minio.internal:9000",
            "s3_public_endpoint_url": "https://s3.example.org",
            "s3_force_path_style": False,
        },
        id="virtual-public-endpoint",
    ),
    pytest.param(
        {"s3_region": "eu-west-1", "s3_bucket_name": "pacs.masks.example"},
        id="aws-dotted-bucket-falls-back-to-path",
    ),
    pytest.param({"s3_region": "eu-west-1", "session_token": True}, id="aws-session-token"),
]


@pytest.mark.parametrize("overrides", _PRESIGN_CONFIGS)
async def test_presigned_urls_are_byte_identical_to_botocore(
    overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = dict(overrides)
    access_key, secret_key = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    token = None
    if overrides.pop("session_token", False):
        # Temporary credentials arrive in the environment, where pydantic reads the keys.
        token = "IQoJb3JpZ2luX2VjE/with+slash=and==padding"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
        monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    settings = Settings(
        _env_file=None,
        **{
            "storage_provider": "s3",
            "s3_public_endpoint_url": None,
            "aws_access_key_id": access_key,
            "aws_secret_access_key": secret_key,
            **overrides,
        },
    )
    storage = await S3Storage.from_settings(settings)
    reference = botocore.session.get_session().create_client(
        "s3",
        region_name=settings.s3_region,
        endpoint_url=settings.s3_public_endpoint_url or settings.s3_endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=token,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if settings.is_path_style else "virtual"},
        ),
    )
    rng = random.Random(f"presign-{overrides}")
    try:
        for key, now, expires_in in _signing_batches(rng):
            content_type = rng.choice(_CONTENT_TYPES)
            content_md5 = base64.b64encode(rng.randbytes(16)).decode()
            frozen = now.astimezone(UTC).replace(tzinfo=None)
            with mock.patch("botocore.auth.get_current_datetime", return_value=frozen):
                expected_put = reference.generate_presigned_url(
                    "put_object",
                    Params={
                        "Bucket": settings.s3_bucket_name,
                        "Key": key,
                        "ContentType": content_type,
                        "ContentMD5": content_md5,
                    },
                    ExpiresIn=expires_in,
                )
                expected_get = reference.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": settings.s3_bucket_name, "Key": key},
                    ExpiresIn=expires_in,
                )
            put = storage.presign_put(
                key,
                content_type=content_type,
                content_md5=content_md5,
                content_length=rng.randint(1, 10**8),
                expires_in=expires_in,
                now=now,
            )
            get = storage.presign_get(key, expires_in=expires_in, now=now)
            assert put.url == expected_put, (key, now, content_type)
            assert get.url == expected_get, (key, now)
            assert put.method == "PUT"
            assert put.headers == (("Content-Type", content_type), ("Content-MD5", content_md5))
            assert put.expires_at == get.expires_at == now + timedelta(seconds=expires_in)
            assert get.method == "GET"
            assert get.headers == ()
    finally:
        reference.close()
        await storage.aclose()


@pytest.mark.parametrize(
    ("overrides", "url_start"),
    [
        ({"s3_endpoint_url": "http://127.0.0.1:9000"}, "http://127.0.0.1:9000/pacs-masks/mask/"),
        (
            {"s3_endpoint_url": "http://minio:9000", "s3_public_endpoint_url": "https://cdn.test"},
            "https://cdn.test/pacs-masks/mask/",
        ),
        ({"s3_region": "eu-west-1"}, "https://pacs-masks.s3.eu-west-1.amazonaws.com/mask/"),
        # botocore keeps the legacy global endpoint for us-east-1.
        ({"s3_region": "us-east-1"}, "https://pacs-masks.s3.amazonaws.com/mask/"),
    ],
)
async def test_presigned_url_base(overrides: dict[str, Any], url_start: str) -> None:
    settings = Settings(
        _env_file=None,
        **{
            "storage_provider": "s3",
            "s3_public_endpoint_url": None,
            "aws_access_key_id": "AKIDEXAMPLE",
            "aws_secret_access_key": "secret",
            **overrides,
        },
    )
    storage = await S3Storage.from_settings(settings)
    try:
        now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
        request = storage.presign_put(
            "mask/12/34/slice_00007_liver.png",
            content_type="image/png",
            content_md5=md5_b64(PNG),
            content_length=len(PNG),
            expires_in=600,
            now=now,
        )
        assert request.url.startswith(url_start + "12/34/slice_00007_liver.png?")
        assert "X-Amz-Date=20260304T050607Z&X-Amz-Expires=600&" in request.url
        assert "X-Amz-SignedHeaders=content-md5%3Bcontent-type%3Bhost&" in request.url
        assert "checksum" not in request.url.lower()
        assert request.expires_at == now + timedelta(seconds=600)
        with pytest.raises(ValueError, match="expires_in"):
            storage.presign_get("mask/1/2/x.png", expires_in=604801, now=now)
        with pytest.raises(ValueError, match="expires_in"):
            storage.presign_get("mask/1/2/x.png", expires_in=0, now=now)
    finally:
        await storage.aclose()


# --- moto: the S3 API, unchecked signatures ------------------------------------------------------


@pytest.fixture(scope="session")
async def moto_storage(moto_server: MotoServer) -> AsyncIterator[S3Storage]:
    storage = await S3Storage.from_settings(
        s3_settings(moto_server.endpoint_url, "testing", "testing", BUCKET)
    )
    await storage.ensure_bucket([VIEWER_ORIGIN])
    yield storage
    await storage.aclose()


def seed_moto(bucket: str, objects: dict[str, bytes]) -> None:
    """Store objects straight in moto's in-process backend: moto serves ~150 PUTs a second,
    and listing tests need thousands of objects. What they list still goes over HTTP."""
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key, body in objects.items():
        backend.put_object(bucket, key, body)


@pytest.mark.s3
async def test_ensure_bucket_creates_bucket_cors_and_keeps_operator_lifecycle_rules(
    moto_server: MotoServer,
) -> None:
    settings = s3_settings(moto_server.endpoint_url, "testing", "testing", "ensure-bucket-test")
    settings = settings.model_copy(update={"s3_region": "eu-west-1"})
    storage = await S3Storage.from_settings(settings)
    client = storage.client
    try:
        await storage.ensure_bucket([VIEWER_ORIGIN, "https://viewer.example.org"])

        location = await client.get_bucket_location(Bucket="ensure-bucket-test")
        assert location["LocationConstraint"] == "eu-west-1"
        cors = await client.get_bucket_cors(Bucket="ensure-bucket-test")
        [rule] = cors["CORSRules"]
        assert rule["AllowedOrigins"] == [VIEWER_ORIGIN, "https://viewer.example.org"]
        assert sorted(rule["AllowedMethods"]) == ["GET", "HEAD", "PUT"]
        assert sorted(rule["AllowedHeaders"]) == ["Content-MD5", "Content-Type"]
        assert rule["ExposeHeaders"] == ["ETag"]
        lifecycle = await client.get_bucket_lifecycle_configuration(Bucket="ensure-bucket-test")
        assert lifecycle["Rules"] == [
            {
                "ID": "abort-incomplete-multipart",
                "Filter": {"Prefix": "mask/"},
                "Status": "Enabled",
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
            }
        ]

        operator_rule = {
            "ID": "expire-scratch",
            "Filter": {"Prefix": "scratch/"},
            "Status": "Enabled",
            "Expiration": {"Days": 7},
        }
        await client.put_bucket_lifecycle_configuration(
            Bucket="ensure-bucket-test",
            LifecycleConfiguration={"Rules": [operator_rule, *lifecycle["Rules"]]},
        )
        # Idempotent, and a second replica starting up must not fail.
        await storage.ensure_bucket([VIEWER_ORIGIN])
        lifecycle = await client.get_bucket_lifecycle_configuration(Bucket="ensure-bucket-test")
        assert sorted(rule["ID"] for rule in lifecycle["Rules"]) == [
            "abort-incomplete-multipart",
            "expire-scratch",
        ]
        cors = await client.get_bucket_cors(Bucket="ensure-bucket-test")
        assert cors["CORSRules"][0]["AllowedOrigins"] == [VIEWER_ORIGIN]
    finally:
        await storage.aclose()


@pytest.mark.s3
async def test_presigned_put_stat_get_and_open_on_moto(moto_storage: S3Storage) -> None:
    annotation_id, group_id = new_group()
    key = mask_key(annotation_id, group_id, 7, "liver", "image/png")
    missing = mask_key(annotation_id, group_id, 8, "liver", "image/png")
    now = datetime.now(UTC)
    upload = moto_storage.presign_put(
        key,
        content_type="image/png",
        content_md5=md5_b64(PNG),
        content_length=len(PNG),
        expires_in=600,
        now=now,
    )
    async with httpx.AsyncClient() as http:
        response = await http.put(upload.url, content=PNG, headers=dict(upload.headers))
        assert response.status_code == 200, response.text
        assert response.headers["ETag"] == f'"{md5_hex(PNG)}"'

        found = await moto_storage.stat_objects([missing, key])
        assert set(found) == {key}
        assert found[key].size == len(PNG)
        assert found[key].md5_hex == md5_hex(PNG)

        download = moto_storage.presign_get(key, expires_in=600, now=now)
        response = await http.get(download.url)
        assert response.status_code == 200
        assert response.content == PNG

    stream = await moto_storage.open(key)
    assert stream is not None
    assert stream.size == len(PNG)
    assert stream.etag == f'"{md5_hex(PNG)}"'
    assert stream.content_type == "image/png"
    assert b"".join([chunk async for chunk in stream.chunks]) == PNG


@pytest.mark.s3
async def test_open_streams_large_objects_in_chunks(moto_storage: S3Storage) -> None:
    key = mask_key(*new_group(), 0, None, "image/png")
    body = random.Random(1).randbytes(200_000)
    await moto_storage.client.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType="image/png")
    stream = await moto_storage.open(key)
    assert stream is not None
    chunks = [chunk async for chunk in stream.chunks]
    assert b"".join(chunks) == body
    assert len(chunks) >= 4
    assert all(len(chunk) <= 64 * 1024 for chunk in chunks)


@pytest.mark.s3
async def test_open_missing_key_is_none(moto_storage: S3Storage) -> None:
    assert await moto_storage.open(mask_key(*new_group(), 0, None, "image/png")) is None


@pytest.mark.s3
async def test_stat_objects_lists_only_as_far_as_the_requested_keys(
    moto_storage: S3Storage,
) -> None:
    annotation_id, group_id = new_group()
    keys = [mask_key(annotation_id, group_id, i, None, "image/png") for i in range(2500)]
    bodies = {key: f"slice {i}".encode() for i, key in enumerate(keys)}
    seed_moto(BUCKET, bodies)
    # Neighbours either side of the group must never be reported.
    seed_moto(BUCKET, {mask_key(annotation_id, group_id - 1, 0, None, "image/png"): b"x"})
    seed_moto(BUCKET, {mask_key(annotation_id, group_id + 1, 0, None, "image/png"): b"x"})

    def expect(found: dict[str, Any], wanted: list[str]) -> None:
        assert sorted(found) == sorted(wanted)
        for key in wanted:
            assert found[key].size == len(bodies[key])
            assert found[key].md5_hex == md5_hex(bodies[key])

    missing = mask_key(annotation_id, group_id, 1, "absent", "image/png")
    with recorded_params(moto_storage, "ListObjectsV2") as calls:
        found = await moto_storage.stat_objects([keys[2], keys[0], missing, keys[1]])
    expect(found, keys[:3])
    assert len(calls) == 1
    assert calls[0]["Prefix"].startswith(group_prefix(annotation_id, group_id))
    assert calls[0]["MaxKeys"] == 1000

    with recorded_params(moto_storage, "ListObjectsV2") as calls:
        found = await moto_storage.stat_objects([keys[1700], keys[1500]])
    expect(found, [keys[1500], keys[1700]])
    assert len(calls) == 1, "StartAfter should skip the first 1500 keys"

    with recorded_params(moto_storage, "ListObjectsV2") as calls:
        found = await moto_storage.stat_objects([keys[2499], keys[0]])
    expect(found, [keys[0], keys[2499]])
    assert len(calls) == 3

    with recorded_params(moto_storage, "ListObjectsV2") as calls:
        found = await moto_storage.stat_objects(keys)
    expect(found, keys)
    assert len(calls) == 3

    assert await moto_storage.stat_objects([]) == {}


@pytest.mark.s3
async def test_delete_prefix_deletes_in_batches_of_1000(moto_storage: S3Storage) -> None:
    annotation_id, group_id = new_group()
    prefix = group_prefix(annotation_id, group_id)
    keys = [mask_key(annotation_id, group_id, i, "liver", "image/png") for i in range(2100)]
    neighbour = mask_key(annotation_id, group_id + 1, 0, None, "image/png")
    seed_moto(BUCKET, {key: b"x" for key in [*keys, neighbour]})

    with recorded_params(moto_storage, "DeleteObjects") as calls:
        assert await moto_storage.delete_prefix(prefix) == 2100
    assert [len(call["Delete"]["Objects"]) for call in calls] == [1000, 1000, 100]
    assert all(call["Delete"]["Quiet"] for call in calls)

    listing = await moto_storage.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    assert listing.get("KeyCount") == 0
    assert await moto_storage.stat_objects([neighbour]) != {}
    assert await moto_storage.delete_prefix(prefix) == 0
    with pytest.raises(ValueError, match="whole bucket"):
        await moto_storage.delete_prefix("")


@pytest.mark.s3
async def test_missing_bucket_is_a_storage_error(moto_server: MotoServer) -> None:
    storage = await S3Storage.from_settings(
        s3_settings(moto_server.endpoint_url, "testing", "testing", "no-such-bucket-here")
    )
    try:
        with pytest.raises(StorageError, match="NoSuchBucket"):
            await storage.stat_objects(["mask/1/2/slice_00000.png"])
        with pytest.raises(StorageError, match="NoSuchBucket"):
            await storage.open("mask/1/2/slice_00000.png")
    finally:
        await storage.aclose()


async def test_unreachable_endpoint_is_a_storage_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now; creating the storage needs no network.
    storage = await S3Storage.from_settings(
        s3_settings(f"http://127.0.0.1:{port}", "testing", "testing-secret", BUCKET)
    )
    try:
        results = await asyncio.gather(
            storage.stat_objects(["mask/1/2/slice_00000.png"]),
            storage.open("mask/1/2/slice_00000.png"),
            storage.delete_prefix("mask/1/2/"),
            storage.ensure_bucket([VIEWER_ORIGIN]),
            return_exceptions=True,
        )
    finally:
        await storage.aclose()
    for result in results:
        assert isinstance(result, StorageError), result
        assert "testing-secret" not in str(result)


# --- rclone: checks signatures, expiry and Content-MD5 -------------------------------------------


@pytest.fixture(scope="session")
async def rclone_storage(rclone_server: RcloneServer) -> AsyncIterator[S3Storage]:
    storage = await S3Storage.from_settings(
        s3_settings(
            rclone_server.endpoint_url, rclone_server.access_key, rclone_server.secret_key, BUCKET
        )
    )
    yield storage
    await storage.aclose()


@pytest.mark.s3
async def test_rclone_refuses_expired_tampered_and_wrong_uploads(
    rclone_storage: S3Storage, rclone_server: RcloneServer
) -> None:
    key = mask_key(*new_group(), 3, "lung", "image/png")
    async with httpx.AsyncClient() as http:
        url, headers = presigned_put(
            rclone_storage, key, PNG, datetime.now(UTC) - timedelta(minutes=10)
        )
        response = await http.put(url, content=PNG, headers=headers)
        assert 400 <= response.status_code < 500, "expired URL accepted"

        url, headers = presigned_put(rclone_storage, key, PNG, datetime.now(UTC))
        signature = url[-64:]
        tampered = url[:-64] + signature[::-1]
        response = await http.put(tampered, content=PNG, headers=headers)
        assert response.status_code == 403, response.text

        response = await http.put(
            url, content=PNG, headers={**headers, "Content-Type": "image/jpeg"}
        )
        assert response.status_code == 403, "Content-Type is not bound by the signature"

        response = await http.put(url, content=PNG + b"tail", headers=headers)
        assert response.status_code == 400, response.text
        assert "BadDigest" in response.text

        assert await rclone_storage.stat_objects([key]) == {}
        assert not (rclone_server.root / BUCKET / key).exists()

        url, headers = presigned_put(rclone_storage, key, PNG, datetime.now(UTC))
        response = await http.put(url, content=PNG, headers=headers)
        assert response.status_code == 200, response.text

        download = rclone_storage.presign_get(key, expires_in=60, now=datetime.now(UTC))
        response = await http.get(download.url)
        assert response.status_code == 200, response.text
        assert response.content == PNG
        expired = rclone_storage.presign_get(
            key, expires_in=60, now=datetime.now(UTC) - timedelta(minutes=5)
        )
        assert 400 <= (await http.get(expired.url)).status_code < 500

    assert (rclone_server.root / BUCKET / key).read_bytes() == PNG


@pytest.mark.s3
async def test_rclone_stat_open_and_delete(rclone_storage: S3Storage) -> None:
    annotation_id, group_id = new_group()
    bodies = {
        mask_key(annotation_id, group_id, i, None, "image/png"): PNG + bytes([i]) * i
        for i in range(5)
    }
    async with httpx.AsyncClient() as http:
        for key, body in bodies.items():
            url, headers = presigned_put(rclone_storage, key, body, datetime.now(UTC))
            response = await http.put(url, content=body, headers=headers)
            assert response.status_code == 200, response.text

    keys = sorted(bodies)
    missing = mask_key(annotation_id, group_id, 2, "absent", "image/png")
    # rclone lists ETags without quotes: md5_hex must come out the same.
    found = await rclone_storage.stat_objects([keys[1], keys[3], missing])
    assert sorted(found) == [keys[1], keys[3]]
    for key in (keys[1], keys[3]):
        assert found[key].size == len(bodies[key])
        assert found[key].md5_hex == md5_hex(bodies[key])

    stream = await rclone_storage.open(keys[4])
    assert stream is not None
    assert stream.etag == f'"{md5_hex(bodies[keys[4]])}"'
    assert b"".join([chunk async for chunk in stream.chunks]) == bodies[keys[4]]
    assert await rclone_storage.open(missing) is None

    assert await rclone_storage.delete_prefix(group_prefix(annotation_id, group_id)) == 5
    assert await rclone_storage.stat_objects(keys) == {}


@pytest.mark.s3
async def test_rclone_ensure_bucket_tolerates_missing_bucket_apis(
    rclone_storage: S3Storage, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.bucket_setup"):
        await rclone_storage.ensure_bucket([VIEWER_ORIGIN])
    messages = [
        record.getMessage() for record in caplog.records if record.name == "app.bucket_setup"
    ]
    assert any("CORS" in message for message in messages), messages
    assert any("lifecycle" in message for message in messages), messages


def test_new_credentials_sign_like_a_new_presigner() -> None:
    """Rotated credentials (temporary ones renewed) must not reuse what the old access key
    made of a URL, even for the same signing time."""
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    old, new = Credentials("AKIDOLD", "secret-1", None), Credentials("AKIDNEW", "secret-2", "tok")
    presigner = Presigner("http://127.0.0.1:9000/bucket", "us-east-1", "s3", old)
    presigner.presign("GET", "mask/1/2/a.png", expires_in=60, now=now)
    presigner.credentials = new
    fresh = Presigner("http://127.0.0.1:9000/bucket", "us-east-1", "s3", new)
    assert presigner.presign("GET", "mask/1/2/a.png", expires_in=60, now=now) == fresh.presign(
        "GET", "mask/1/2/a.png", expires_in=60, now=now
    )


@given(
    now=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    ttl=st.integers(min_value=1, max_value=7 * 24 * 3600),
)
def test_signing_time_keeps_nine_tenths_of_the_ttl(now: datetime, ttl: int) -> None:
    """Masks' GETs are signed at a rounded time, so that a tree read again gets the same URLs;
    the URL still lives at least 9/10 of the TTL asked, and never longer than it."""
    signed = signing_time(now, ttl)
    step = min(MAX_SIGNING_STEP_SECONDS, max(1, ttl // 10))
    assert signed <= now < signed + timedelta(seconds=step)
    assert signed.timestamp() % step == 0
    assert signed + timedelta(seconds=ttl) - now >= timedelta(seconds=ttl) * 0.9 - timedelta(
        seconds=1
    )
    assert signing_time(signed + timedelta(seconds=step - 1), ttl) == signed
    # A naive time is read as UTC.
    assert signing_time(now.replace(tzinfo=None), ttl) == signed


def test_a_signed_get_is_reused_within_its_signing_time() -> None:
    credentials = Credentials("AKIDEXAMPLE", "secret", None)
    now = datetime(2026, 1, 2, 3, 4, 0, tzinfo=UTC)
    presigner = Presigner("http://127.0.0.1:9000/bucket", "us-east-1", "s3", credentials)
    first = presigner.presign("GET", "mask/1/2/a.png", expires_in=600, now=now)
    assert presigner.presign("GET", "mask/1/2/a.png", expires_in=600, now=now) is first
    later = presigner.presign("GET", "mask/1/2/a.png", expires_in=600, now=now + timedelta(1))
    assert later != first
    # Signed PUTs cover a body's checksum: never reused.
    put = {"content_type": "image/png", "content_md5": "1B2M2Y8AsgTpgAmY7PhCfg=="}
    one = presigner.presign("PUT", "mask/1/2/a.png", expires_in=600, now=now, **put)
    assert presigner.presign("PUT", "mask/1/2/a.png", expires_in=600, now=now, **put) is not one
