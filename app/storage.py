"""The storage protocol and the key rule.

Backends: `app.s3` (S3 / MinIO through aiobotocore) and `app.local_storage` (local disk,
served and verified by this app under /storage/...); `app.main.open_storage` picks one.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from app.config import CONTENT_TYPE_EXTENSIONS

KEY_ROOT = "mask"
# \Z, not $: "$" also matches before a trailing newline, which would reach a key.
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
LIST_PAGE_SIZE = 1000


class StorageError(Exception):
    """Storage could not be reached or refused a request we expected it to accept."""


class StorageRefused(StorageError):
    """The server answered with an error; callers that expect some codes inspect `code`."""

    def __init__(self, operation: str, code: str, status: int) -> None:
        super().__init__(f"S3 {operation} failed: {code} (HTTP {status})")
        self.code = code
        self.status = status


def group_prefix(annotation_id: int, group_id: int) -> str:
    return f"{KEY_ROOT}/{annotation_id}/{group_id}/"


def mask_key(
    annotation_id: int, group_id: int, slice_index: int, label_name: str | None, content_type: str
) -> str:
    """mask/{annotation_id}/{group_id}/slice_00007[_label].png; callers validate the label."""
    extension = CONTENT_TYPE_EXTENSIONS[content_type]
    suffix = f"_{label_name}" if label_name else ""
    return f"{group_prefix(annotation_id, group_id)}slice_{slice_index:05d}{suffix}.{extension}"


def md5_base64_to_hex(content_md5: str) -> str | None:
    """The hex digest of an RFC 1864 Content-MD5 value, None if it is not one."""
    try:
        raw = base64.b64decode(content_md5, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None


def md5_hex_to_base64(md5_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")


# A presigned GET of a stored mask is signed at a time rounded down to a tenth of its TTL (a
# minute at most): within that step the same object gets the same URL, so a tree read again
# is answered with URLs already signed (app.sigv4.Presigner keeps them) and a browser's cache
# can answer the image it loaded before. Such a URL lives between 9/10 of the TTL and the TTL.
MAX_SIGNING_STEP_SECONDS = 60


# A list of masks shares one `now`: the rounding (~2 µs a call) is done once for it.
@functools.lru_cache(maxsize=256)
def signing_time(now: datetime, ttl_seconds: int) -> datetime:
    step = min(MAX_SIGNING_STEP_SECONDS, max(1, ttl_seconds // 10))
    seconds = int((now if now.tzinfo is not None else now.replace(tzinfo=UTC)).timestamp())
    return datetime.fromtimestamp(seconds - seconds % step, tz=UTC)


@dataclass(frozen=True, slots=True)
class SignedRequest:
    url: str
    method: str
    # Headers the client must send exactly as given: they are part of the signature.
    headers: tuple[tuple[str, str], ...]
    expires_at: datetime


def signed_put(
    url: str, *, content_type: str, content_md5: str, expires_in: int, now: datetime
) -> SignedRequest:
    """A signed PUT whose Content-Type and Content-MD5 the signature covers."""
    return SignedRequest(
        url=url,
        method="PUT",
        headers=(("Content-Type", content_type), ("Content-MD5", content_md5)),
        expires_at=now + timedelta(seconds=expires_in),
    )


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    # Lowercase hex MD5 of the content when storage knows it (single-part PUT), else None.
    md5_hex: str | None


@dataclass(frozen=True, slots=True)
class ListedObject:
    key: str
    size: int
    modified: datetime


@dataclass(frozen=True, slots=True)
class ObjectStream:
    size: int
    etag: str
    content_type: str
    chunks: AsyncIterator[bytes]


class Storage(Protocol):
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
        """A PUT that storage accepts only with this Content-Type and Content-MD5 (base64)."""
        ...

    def presign_get(self, key: str, *, expires_in: int, now: datetime) -> SignedRequest: ...

    async def stat_objects(self, keys: Sequence[str]) -> dict[str, StoredObject]:
        """Size and MD5 of those of `keys` that exist, by listing (one call per 1000 keys),
        never one request per key. All keys share one group prefix."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object under `prefix`; returns how many were removed."""
        ...

    def list_objects(self, prefix: str) -> AsyncIterator[list[ListedObject]]:
        """Every object under `prefix` in key order, one page (one call) per 1000 keys."""
        ...

    async def delete_objects(self, keys: Sequence[str]) -> int:
        """Remove these objects (one call per 1000 keys); returns how many were asked for."""
        ...

    async def open(self, key: str) -> ObjectStream | None:
        """Stream one object; None when it does not exist."""
        ...

    async def ensure_bucket(self, cors_origins: Sequence[str]) -> None:
        """Create the bucket (or folder) if missing and apply CORS for the viewer origins."""
        ...

    async def aclose(self) -> None: ...
