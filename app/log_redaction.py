"""Credentials never reach a log line: signed storage URLs (valid for up to an hour) lose their
query string or signature, API tokens their secret part.

`RedactSecrets` is a logging filter for any handler; the command line puts it on its root
handler and `serve` on the handler of its JSON or text logs (app/logging_setup.py)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from app.tokens import TOKEN_PREFIX

REDACTED = "[redacted]"
# The local backend's URLs carry expiry, length and signature in the query: all of it goes.
_STORAGE_QUERY = re.compile(r"(/storage/[^\s?\"']*)\?[^\s\"']*")
# SigV4 presigned URLs (S3, MinIO) and any other signed URL: the signing parameters' values.
_SIGNED_PARAMETER = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig)=)"
    r"[^&\s\"']*"
)
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    text = _STORAGE_QUERY.sub(rf"\1?{REDACTED}", text)
    text = _SIGNED_PARAMETER.sub(rf"\1{REDACTED}", text)
    return _TOKEN.sub(TOKEN_PREFIX + REDACTED, text)


def _redact_value(value: object) -> object:
    return redact(value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """Rewrites the message and its arguments in place; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, Mapping):
            record.args = {key: _redact_value(value) for key, value in record.args.items()}
        elif isinstance(record.args, tuple):
            # uvicorn's access formatter unpacks exactly five arguments: keep the shape.
            record.args = tuple(_redact_value(value) for value in record.args)
        return True
