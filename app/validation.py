"""Input rules shared by the domain modules: each rule written once, each refusal a
BadUserInput naming the field."""

from __future__ import annotations

import re
from typing import Any

from app.config import Settings
from app.errors import BadUserInput, Conflict, NotFound
from app.models import MAX_ID

# DICOM PS3.5 §9.1: digits and dots, no leading zeros in a component, at most 64 characters.
# \Z, not $: "$" also matches before a trailing newline.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")
UID_MAX_LENGTH = 64
SHORT_TEXT_MAX = 256
DESCRIPTION_MAX = 4000
MODALITY_MAX = 16
MAX_DIMENSION = 65535
MAX_PROBLEMS_REPORTED = 50


def is_uid(value: str) -> bool:
    return len(value) <= UID_MAX_LENGTH and UID_PATTERN.match(value) is not None


def validate_uid(field: str, value: str | None, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise BadUserInput(f"{field} is required", field=field)
        return None
    if not is_uid(value):
        raise BadUserInput(
            f"{field} must be a DICOM UID (digits and dots, at most 64 characters)", field=field
        )
    return value


def validate_text(field: str, value: str | None, max_length: int = SHORT_TEXT_MAX) -> str | None:
    if value is None:
        return None
    if len(value) > max_length:
        raise BadUserInput(f"{field} is longer than {max_length} characters", field=field)
    if any(ord(char) < 32 and char not in "\t\n\r" for char in value):
        raise BadUserInput(f"{field} contains control characters", field=field)
    return value


def parse_id(field: str, value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise BadUserInput(f"{field} is not a valid id: {value[:40]!r}", field=field)
    # Beyond the id columns' range nothing exists (and PostgreSQL would refuse the query).
    if len(value.lstrip("0")) > len(str(MAX_ID)) or int(value) > MAX_ID:
        raise NotFound(f"{field} {value[:40]} does not exist", field=field)
    return int(value)


def check_page(limit: int | None, offset: int, *, max_limit: int | None = None) -> None:
    """A page of a list: `limit` 1..max_limit when there is a maximum, else any count >= 0."""
    if limit is not None and max_limit is not None and not 1 <= limit <= max_limit:
        raise BadUserInput(f"limit must be between 1 and {max_limit}", field="limit")
    if limit is not None and limit < 0:
        raise BadUserInput("limit must not be negative", field="limit")
    if offset < 0:
        raise BadUserInput("offset must not be negative", field="offset")


def signed_url_ttl(settings: Settings, ttl_seconds: int | None) -> int:
    ttl = settings.signed_url_default_ttl if ttl_seconds is None else ttl_seconds
    if not 1 <= ttl <= settings.signed_url_max_ttl:
        raise BadUserInput(
            f"ttlSeconds must be between 1 and {settings.signed_url_max_ttl}", field="ttlSeconds"
        )
    return ttl


class Problems:
    """Collects every offending slice of a batch so one error names them all."""

    def __init__(self) -> None:
        self.slice_indexes: list[int] = []
        self.details: list[dict[str, Any]] = []

    def add(self, slice_index: int, field: str, message: str) -> None:
        self.slice_indexes.append(slice_index)
        if len(self.details) < MAX_PROBLEMS_REPORTED:
            self.details.append({"sliceIndex": slice_index, "field": field, "message": message})

    def raise_if_any(self, error: type[BadUserInput | Conflict] = BadUserInput) -> None:
        if not self.slice_indexes:
            return
        count = len(set(self.slice_indexes))
        first = self.details[0]
        raise error(
            f"{count} slice(s) refused; slice {first['sliceIndex']}: {first['message']}",
            slice_indexes=self.slice_indexes,
            problems=self.details,
        )
