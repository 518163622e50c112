"""S3 / MinIO storage through aiobotocore; URLs are presigned by `app.sigv4`."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from app.bucket_setup import configure_bucket
from app.config import Settings
from app.sigv4 import Credentials, Presigner, checked_presigner
from app.storage import (
    LIST_PAGE_SIZE,
    ListedObject,
    ObjectStream,
    SignedRequest,
    StorageError,
    StorageRefused,
    StoredObject,
    signed_put,
)

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024
# S3 refuses DeleteObjects with more keys than this (moto does not, so it would not tell us).
DELETE_BATCH_SIZE = 1000
# Refreshable credentials (instance roles, web identity, SSO) are re-frozen this often; botocore
# itself refreshes them 15 minutes before they expire, so a minute is well inside that window.
CREDENTIAL_REFRESH_SECONDS = 60.0

_MD5_HEX = re.compile(r"[0-9a-f]{32}")
# HEAD answers carry no body, so a missing object there is just "404".
_NO_SUCH_KEY_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


class _BodyChunks:
    """The body of one GetObject in CHUNK_SIZE pieces; the connection goes back to the pool
    when the body ends, fails, or the consumer calls aclose() without reading it all."""

    def __init__(self, body: Any) -> None:
        self._body: Any = body

    def __aiter__(self) -> _BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._body is None:
            raise StopAsyncIteration
        try:
            chunk: bytes = await self._body.read(CHUNK_SIZE)
        except (BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
            await self.aclose()
            raise StorageError(f"S3 GetObject body: {type(exc).__name__}") from exc
        except BaseException:
            await self.aclose()
            raise
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            await body.aclose()

    def __del__(self) -> None:
        # A stream dropped unread must not keep its pooled connection checked out.
        body = self._body
        if body is not None and not inspect.iscoroutinefunction(body.close):
            body.close()


def _unquote_etag(etag: str) -> str:
    return etag.strip().strip('"')


def _md5_from_etag(etag: str | None) -> str | None:
    value = _unquote_etag(etag or "").lower()
    return value if _MD5_HEX.fullmatch(value) else None


def _just_before(key: str) -> str:
    # A StartAfter that lets `key` itself be listed. Only the keys between the two (none in
    # practice) are listed needlessly, and they are filtered out anyway.
    last = key[-1]
    if "!" <= last <= "~":
        return key[:-1] + chr(ord(last) - 1)
    return key[:-1]


def _timestamp(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _common_prefix(first: str, last: str) -> str:
    size = 0
    for a, b in zip(first, last, strict=False):
        if a != b:
            break
        size += 1
    return first[:size]


def _client_config(settings: Settings) -> AioConfig:
    return AioConfig(
        signature_version="s3v4",
        s3={"addressing_style": "path" if settings.is_path_style else "virtual"},
        connect_timeout=settings.storage_connect_timeout,
        read_timeout=settings.storage_read_timeout,
        # total_max_attempts counts the first try; botocore's max_attempts would not.
        retries={"mode": "standard", "total_max_attempts": settings.storage_max_attempts},
        # Loading the S3 model takes tens of ms; a worker thread keeps the loop responsive.
        warm_up_loader_caches=True,
    )


def _explicit_credentials(settings: Settings) -> Credentials | None:
    if not (settings.aws_access_key_id and settings.aws_secret_access_key):
        return None
    return Credentials(
        settings.aws_access_key_id,
        settings.aws_secret_access_key,
        settings.aws_session_token or None,
    )


async def _frozen(credentials: Any) -> Credentials:
    frozen = await credentials.get_frozen_credentials()
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token or None)


class S3Storage:
    def __init__(
        self,
        client: Any,
        bucket: str,
        region: str,
        presigner: Presigner,
        exit_stack: AsyncExitStack,
        deadline: float = 120.0,
        mask_expiry_days: int | None = None,
    ) -> None:
        self._client: Any = client
        self._mask_expiry_days = mask_expiry_days
        self._bucket = bucket
        self._region = region
        self._presigner = presigner
        self._exit_stack = exit_stack
        self._refresh_task: asyncio.Task[None] | None = None
        # A hard bound per call, waiting for a pooled connection included: botocore's timeouts
        # cover each socket operation only.
        self._deadline = deadline

    @classmethod
    async def from_settings(cls, settings: Settings) -> S3Storage:
        session = get_session()
        # We never read LastModified; parsing 1000 of them per listing costs ~50 ms of CPU.
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
        config = _client_config(settings)
        explicit = _explicit_credentials(settings)
        chain: Any = None
        if explicit is None:
            try:
                chain = await session.get_credentials()
            except BotoCoreError as exc:
                raise StorageError(f"AWS credentials: {type(exc).__name__}") from exc
            if chain is None:
                raise StorageError("no AWS credentials: set AWS_ACCESS_KEY_ID/SECRET or a role")
            credentials = await _frozen(chain)
        else:
            credentials = explicit
        client_credentials: dict[str, Any] = {}
        if explicit is not None:
            client_credentials = {
                "aws_access_key_id": explicit.access_key,
                "aws_secret_access_key": explicit.secret_key,
                "aws_session_token": explicit.token,
            }

        exit_stack = AsyncExitStack()
        try:
            client = await exit_stack.enter_async_context(
                session.create_client(
                    "s3",
                    region_name=settings.s3_region,
                    endpoint_url=settings.s3_endpoint_url,
                    config=config,
                    **client_credentials,
                )
            )
            presigner = await checked_presigner(session, settings, config, credentials)
        except BaseException:
            await exit_stack.aclose()
            raise
        storage = cls(
            client,
            settings.s3_bucket_name,
            settings.s3_region,
            presigner,
            exit_stack,
            settings.storage_call_deadline,
            mask_expiry_days=settings.s3_mask_expiry_days,
        )
        if chain is not None and getattr(chain, "refresh_needed", None) is not None:
            storage._refresh_task = asyncio.create_task(storage._keep_credentials_fresh(chain))
        return storage

    @property
    def client(self) -> Any:
        """The aiobotocore S3 client, for set-up commands and tests."""
        return self._client

    @property
    def bucket(self) -> str:
        return self._bucket

    async def _keep_credentials_fresh(self, chain: Any) -> None:
        while True:
            await asyncio.sleep(CREDENTIAL_REFRESH_SECONDS)
            try:
                credentials = await _frozen(chain)
            except Exception:
                log.warning("refreshing AWS credentials for presigning failed", exc_info=True)
                continue
            if credentials != self._presigner.credentials:
                self._presigner.credentials = credentials

    async def aclose(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        await self._exit_stack.aclose()

    def presign_put(
        self,
        key: str,
        *,
        content_type: str,
        content_md5: str,
        content_length: int,
        expires_in: int,
        now: datetime,
    ) -> SignedRequest:
        # content_length is not signed: S3 has no way to bind it in a presigned PUT, and the
        # completion check compares sizes.
        url = self._presigner.presign(
            "PUT",
            key,
            expires_in=expires_in,
            now=now,
            content_type=content_type,
            content_md5=content_md5,
        )
        return signed_put(
            url, content_type=content_type, content_md5=content_md5, expires_in=expires_in, now=now
        )

    def presign_get(self, key: str, *, expires_in: int, now: datetime) -> SignedRequest:
        url = self._presigner.presign("GET", key, expires_in=expires_in, now=now)
        return SignedRequest(
            url=url, method="GET", headers=(), expires_at=now + timedelta(seconds=expires_in)
        )

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        method = getattr(self._client, operation)
        try:
            async with asyncio.timeout(self._deadline):
                response: dict[str, Any] = await method(**params)
        except ClientError as exc:
            error = exc.response.get("Error") or {}
            metadata = exc.response.get("ResponseMetadata") or {}
            code = str(error.get("Code") or "Unknown")
            raise StorageRefused(operation, code, int(metadata.get("HTTPStatusCode") or 0)) from exc
        except (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise StorageError(f"S3 {operation}: {type(exc).__name__}") from exc
        return response

    async def stat_objects(self, keys: Sequence[str]) -> dict[str, StoredObject]:
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        first, last = wanted[0], wanted[-1]
        wanted_set = set(wanted)
        found: dict[str, StoredObject] = {}
        start_after = _just_before(first)
        while True:
            page = await self._call(
                "list_objects_v2",
                Bucket=self._bucket,
                Prefix=_common_prefix(first, last),
                StartAfter=start_after,
                MaxKeys=LIST_PAGE_SIZE,
            )
            contents: list[dict[str, Any]] = page.get("Contents") or []
            for item in contents:
                key = str(item["Key"])
                if key > last:
                    return found
                if key in wanted_set:
                    found[key] = StoredObject(
                        key=key, size=int(item["Size"]), md5_hex=_md5_from_etag(item.get("ETag"))
                    )
            if not page.get("IsTruncated") or not contents or len(found) == len(wanted_set):
                return found
            # StartAfter rather than continuation tokens: every server implements it the same.
            start_after = str(contents[-1]["Key"])

    async def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        # Listing resumes after the last key of the page (StartAfter), so deleting it is safe.
        async for page in self.list_objects(prefix):
            deleted += await self.delete_objects([item.key for item in page])
        return deleted

    async def list_objects(self, prefix: str) -> AsyncIterator[list[ListedObject]]:
        if not prefix:
            raise ValueError("refusing to list or delete the whole bucket")
        start_after = ""
        while True:
            params: dict[str, Any] = {
                "Bucket": self._bucket,
                "Prefix": prefix,
                "MaxKeys": LIST_PAGE_SIZE,
            }
            if start_after:
                params["StartAfter"] = start_after
            page = await self._call("list_objects_v2", **params)
            contents: list[dict[str, Any]] = page.get("Contents") or []
            if contents:
                # The parser leaves timestamps as text (see from_settings).
                yield [
                    ListedObject(
                        key=str(item["Key"]),
                        size=int(item["Size"]),
                        modified=_timestamp(item["LastModified"]),
                    )
                    for item in contents
                ]
            if not page.get("IsTruncated") or not contents:
                return
            start_after = str(contents[-1]["Key"])

    async def delete_objects(self, keys: Sequence[str]) -> int:
        for offset in range(0, len(keys), DELETE_BATCH_SIZE):
            batch = keys[offset : offset + DELETE_BATCH_SIZE]
            response = await self._call(
                "delete_objects",
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
            errors: list[dict[str, Any]] = response.get("Errors") or []
            if errors:
                codes = sorted({str(error.get("Code")) for error in errors})
                raise StorageError(
                    f"S3 DeleteObjects refused {len(errors)} of {len(batch)} keys: "
                    + ", ".join(codes)
                )
        return len(keys)

    async def open(self, key: str) -> ObjectStream | None:
        try:
            response = await self._call("get_object", Bucket=self._bucket, Key=key)
        except StorageRefused as exc:
            # A missing bucket is a broken configuration, not a missing mask.
            if exc.code in _NO_SUCH_KEY_CODES:
                return None
            raise
        chunks: AsyncIterator[bytes] = _BodyChunks(response["Body"])
        return ObjectStream(
            size=int(response["ContentLength"]),
            etag=f'"{_unquote_etag(str(response.get("ETag") or ""))}"',
            content_type=str(response.get("ContentType") or "application/octet-stream"),
            chunks=chunks,
        )

    async def ensure_bucket(self, cors_origins: Sequence[str]) -> None:
        await configure_bucket(
            self._call, self._bucket, self._region, cors_origins, self._mask_expiry_days
        )
