"""The S3 backend against SeaweedFS, a production object store that checks what S3 checks:
signatures, expiry, the signed Content-Type and Content-MD5; multipart ETags as AWS makes them."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from storage_servers import SeaweedServer, presigned_put, s3_settings

from app.s3 import S3Storage
from app.storage import mask_key

PNG = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(120)

pytestmark = pytest.mark.s3


def md5_b64(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


@pytest.fixture(scope="module")
async def seaweed_storage(seaweed_server: SeaweedServer) -> AsyncIterator[S3Storage]:
    settings = s3_settings(
        seaweed_server.endpoint_url,
        seaweed_server.access_key,
        seaweed_server.secret_key,
        f"backend-{secrets.token_hex(4)}",
    )
    storage = await S3Storage.from_settings(settings)
    await storage.ensure_bucket([])
    yield storage
    await storage.aclose()


async def test_refuses_expired_tampered_and_wrong_uploads(seaweed_storage: S3Storage) -> None:
    key = mask_key(1, 1, 3, "lung", "image/png")
    async with httpx.AsyncClient() as http:
        url, headers = presigned_put(
            seaweed_storage, key, PNG, datetime.now(UTC) - timedelta(minutes=10)
        )
        assert (await http.put(url, content=PNG, headers=headers)).status_code == 403

        url, headers = presigned_put(seaweed_storage, key, PNG, datetime.now(UTC))
        tampered = url[:-64] + url[-64:][::-1]
        assert (await http.put(tampered, content=PNG, headers=headers)).status_code == 403
        other_type = {**headers, "Content-Type": "image/jpeg"}
        assert (await http.put(url, content=PNG, headers=other_type)).status_code == 403
        wrong_body = await http.put(url, content=PNG[::-1], headers=headers)
        assert wrong_body.status_code == 400
        assert "BadDigest" in wrong_body.text
        assert await seaweed_storage.stat_objects([key]) == {}

        assert (await http.put(url, content=PNG, headers=headers)).status_code == 200
        found = await seaweed_storage.stat_objects([key])
        assert found[key].size == len(PNG)
        assert found[key].md5_hex == hashlib.md5(PNG).hexdigest()

        download = seaweed_storage.presign_get(key, expires_in=60, now=datetime.now(UTC))
        fetched = await http.get(download.url)
        assert fetched.content == PNG
        expired = seaweed_storage.presign_get(
            key, expires_in=60, now=datetime.now(UTC) - timedelta(minutes=5)
        )
        assert (await http.get(expired.url)).status_code == 403
    assert await seaweed_storage.delete_prefix("mask/1/1/") == 1


async def test_a_multipart_object_is_never_taken_for_its_md5(seaweed_storage: S3Storage) -> None:
    """Our URLs are single PUTs; an object assembled from parts has an `…-N` ETag, which
    completion must treat as a mismatch rather than read as a digest."""
    key = mask_key(1, 2, 0, None, "image/png")
    client, bucket = seaweed_storage.client, seaweed_storage.bucket
    upload = await client.create_multipart_upload(Bucket=bucket, Key=key)
    part = await client.upload_part(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=PNG
    )
    await client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    found = await seaweed_storage.stat_objects([key])
    assert found[key].size == len(PNG)
    assert found[key].md5_hex is None
    assert await seaweed_storage.delete_prefix("mask/1/2/") == 1


async def test_wrong_credentials_are_refused(seaweed_server: SeaweedServer) -> None:
    settings = s3_settings(
        seaweed_server.endpoint_url, seaweed_server.access_key, "not-the-secret", "any-bucket"
    )
    storage = await S3Storage.from_settings(settings)
    try:
        url, headers = presigned_put(
            storage, mask_key(1, 3, 0, None, "image/png"), PNG, datetime.now(UTC)
        )
        async with httpx.AsyncClient() as http:
            assert (await http.put(url, content=PNG, headers=headers)).status_code == 403
    finally:
        await storage.aclose()
