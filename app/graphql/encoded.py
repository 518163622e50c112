"""Lists completed straight to JSON, and how the response encoders write them.

A 10 × 10,000 mask tree completed to dicts held ~90 MB of dicts and strings until the response
was encoded; the same lists as JSON bytes take ~28 MB. The fast completion path
(app/graphql/execution.py) encodes each long list chunk by chunk with orjson as it completes
it, and the response encoders splice those bytes in unchanged, so the response is the same
bytes either way."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson

# Items completed to dicts at a time before they are encoded (and their dicts freed).
CHUNK_ITEMS = 1000


class EncodedList:
    """A completed list as the JSON bytes orjson wrote for it."""

    __slots__ = ("json",)

    def __init__(self, json: bytes) -> None:
        self.json = json


def encode_list(items: Sequence[Any], complete: Callable[[Any], Any]) -> EncodedList | None:
    """`items` completed and encoded CHUNK_ITEMS at a time; None when orjson refuses a value
    (an integer past 64 bits): the caller then completes the list to Python values."""
    parts: list[bytes] = []
    try:
        for chunk in _chunks(items):
            parts.append(orjson.dumps([complete(item) for item in chunk])[1:-1])
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None
    return EncodedList(b"[" + b",".join(parts) + b"]")


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), CHUNK_ITEMS):
        yield items[start : start + CHUNK_ITEMS]


def as_fragment(value: Any) -> orjson.Fragment:
    """orjson's `default`: an encoded list is written as its bytes."""
    if isinstance(value, EncodedList):
        return orjson.Fragment(value.json)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def as_python(value: Any) -> Any:
    """The standard encoder's `default`: an encoded list is decoded and written again, as the
    list it was built from would have been (orjson's values read back as the same values)."""
    if isinstance(value, EncodedList):
        return json.loads(value.json)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
