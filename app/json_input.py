"""Free JSON inputs (`inferenceParameters`): bounded in size and nesting, and refused when
PostgreSQL's json type would refuse them (NaN, Infinity), with a coded error instead of a
failure inside the INSERT."""

from __future__ import annotations

import json
from typing import Any

from app.errors import BadUserInput

# Far above any parameter file, far below the recursion limit that serialising it meets.
MAX_JSON_DEPTH = 32


def validate_json_input(field: str, value: Any, *, max_bytes: int) -> Any:
    if value is None:
        return None
    _check_depth(field, value)
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(text.encode("utf-8"))
    except ValueError as error:  # NaN/Infinity, or a lone surrogate in a string
        raise BadUserInput(
            f"{field} must be plain JSON (no NaN, Infinity or unpaired surrogates)", field=field
        ) from error
    if size > max_bytes:
        raise BadUserInput(
            f"{field} is {size} bytes of JSON; at most {max_bytes} are accepted "
            "(MAX_JSON_INPUT_BYTES)",
            field=field,
            bytes=size,
            maxBytes=max_bytes,
        )
    return value


def _check_depth(field: str, value: Any) -> None:
    # Iterative, so that the check itself cannot exhaust the stack.
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadUserInput(
                f"{field} is nested deeper than {MAX_JSON_DEPTH} levels", field=field
            )
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
