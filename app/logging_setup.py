"""Logging for `serve`: JSON lines (python-json-logger) for log collectors, or text on a terminal;
every record made while a request runs carries its request id, user and GraphQL operation."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from app.config import Settings
from app.log_redaction import RedactSecrets

# The running request's scope["state"]: the view adds the user and the operation to it.
REQUEST_STATE: ContextVar[dict[str, Any] | None] = ContextVar("request_state", default=None)
REQUEST_FIELDS = ("request_id", "user", "operation")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def add_server_timing(metric: str, seconds: float) -> None:
    """Time the running request spent waiting on `metric` (storage, say): the access
    middleware reports it in Server-Timing beside the request's own `app` time."""
    state = REQUEST_STATE.get()
    if state is not None:
        timings: dict[str, float] = state.setdefault("server_timing", {})
        timings[metric] = timings.get(metric, 0.0) + seconds


class RequestContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        state = REQUEST_STATE.get() or {}
        for name in REQUEST_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, state.get(name))
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.request_id is None:  # type: ignore[attr-defined]
            record.request_id = "-"
        return super().format(record)


def _json_formatter() -> logging.Formatter:
    # "time": ISO 8601 in UTC, from the record's own timestamp.
    # "pid": which worker process of `serve --workers N` wrote the line.
    return JsonFormatter(
        "%(levelname)s %(name)s %(process)d %(message)s",
        rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
        timestamp="time",
        json_ensure_ascii=False,
    )


def uses_json(settings: Settings, stream: TextIO) -> bool:
    if settings.log_format == "auto":
        return not stream.isatty()
    return settings.log_format == "json"


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Replaces the root handlers; uvicorn's loggers propagate to it (its access log is off:
    ours never writes query strings, which carry storage signatures)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.addFilter(RedactSecrets())
    handler.setFormatter(
        _json_formatter() if uses_json(settings, stream) else _TextFormatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
