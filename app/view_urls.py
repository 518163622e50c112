"""Short-lived signed view URLs, so that a browser's `<img>` (which cannot send a bearer
header) loads a mask without any token in the URL.

`Mask.viewUrl` is `/api/mask-group/{g}/view?slice=N[&label=L]&expires=E&signature=S`, where S
is an HMAC-SHA256 (truncated to 128 bits) over group, slice, label and expiry with a server
secret. Expiries are rounded down to a step of a fifth of the TTL, so the same image keeps the
same URL for that long and the browser's cache can answer it; a URL lives between 4/5 of the
TTL and the TTL."""

from __future__ import annotations

import base64
import functools
import hmac
import math
import time
from collections.abc import Mapping
from urllib.parse import quote

from app.config import Settings
from app.local_storage import load_or_create_secret

try:
    # OpenSSL's HMAC object, whose copy() is one C call; hmac.HMAC wraps the same object in
    # Python (a copy costs ~4 µs more, and a tree signs one URL per mask).
    from _hashlib import hmac_new as keyed_hmac
except ImportError:  # Python built without OpenSSL
    keyed_hmac = hmac.new  # type: ignore[assignment]

SECRET_FILE = "view-url-secret"
SIGNATURE_BYTES = 16
# URLs kept for reuse: within a step a tree read again asks for the same ones. ~0.2 KiB each.
URL_CACHE_SIZE = 8192


class ViewUrlSigner:
    def __init__(self, secret: bytes, ttl_seconds: int) -> None:
        self._mac = keyed_hmac(secret, b"pacs-masks view url\n", "sha256")
        self.ttl_seconds = ttl_seconds
        self._step = max(1, ttl_seconds // 5)
        self.url = functools.lru_cache(maxsize=URL_CACHE_SIZE)(self._url)  # type: ignore[method-assign]

    @classmethod
    def from_settings(cls, settings: Settings) -> ViewUrlSigner:
        # Replicas must share the secret: VIEW_URL_SECRET, or a shared var/ folder.
        secret = settings.view_url_secret.encode() or load_or_create_secret(
            settings.var_dir / SECRET_FILE
        )
        return cls(secret, settings.view_url_ttl)

    def _signature(self, group_id: str, slice_index: str, label: str, expires: str) -> str:
        mac = self._mac.copy()
        mac.update(f"{group_id}\n{slice_index}\n{label}\n{expires}".encode())
        return base64.urlsafe_b64encode(mac.digest()[:SIGNATURE_BYTES]).rstrip(b"=").decode()

    def current_expiry(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return math.floor(now / self._step) * self._step + self.ttl_seconds

    def url(self, group_id: int | str, slice_index: int, label: str | None, expires: int) -> str:
        return self._url(group_id, slice_index, label, expires)

    def _url(self, group_id: int | str, slice_index: int, label: str | None, expires: int) -> str:
        label_part = f"&label={quote(label)}" if label else ""
        signature = self._signature(str(group_id), str(slice_index), label or "", str(expires))
        return (
            f"/api/mask-group/{group_id}/view?slice={slice_index}{label_part}"
            f"&expires={expires}&signature={signature}"
        )

    def seconds_left(
        self, group_id: int | str, query: Mapping[str, str], now: float | None = None
    ) -> int | None:
        """Seconds the signed query stays valid, or None when it is forged, altered or
        expired."""
        expires = query.get("expires", "")
        if not expires.isascii() or not expires.isdigit() or len(expires) > 12:
            return None
        expected = self._signature(
            str(group_id), query.get("slice", ""), query.get("label", ""), expires
        )
        if not hmac.compare_digest(expected, query.get("signature", "")):
            return None
        left = int(expires) - math.floor(time.time() if now is None else now)
        # Never longer than the TTL, whatever was signed under an earlier, longer setting.
        return left if 0 < left <= self.ttl_seconds else None
