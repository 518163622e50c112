"""Python's cyclic garbage collector in a server whose requests build large batches.

CPython's full collections walk every tracked object, and after start-up that is mostly what
was imported and built once (modules, the schema, SQLAlchemy's and botocore's metadata:
~250,000 objects here), which no collection will ever free. A 5000-slice
requestMaskUploadUrls spent 16-380 ms (median ~215 ms) in the collector that way. Once
start-up is over those objects are frozen (`gc.freeze`: moved to a generation the collector
never scans); the same request then spends ~30-100 ms in it.

The thresholds stay CPython's (a young collection per 700 net allocations). Fewer
collections were measured too (young thresholds of 3000 to 50,000; bench/batches.py and the
notes in README's "Batch figures") and cut the collector's time to ~10 ms, but every large
request then leaves its reference cycles for a full collection that comes much later: the
server's memory grew by 4-6 MiB with each 5000-slice request instead of staying flat.
GC_TUNING=false leaves the collector alone, for comparison. Either way each answer's
Server-Timing carries `gc;dur=MS`, the time its request spent in collections."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from app.logging_setup import add_server_timing


def tune_gc(enabled: bool) -> Callable[[], None]:
    """Called once everything long-lived exists (the end of the app's start-up); returns what
    undoes it at shutdown: the frozen objects go back to the collector, so a process that runs
    the app more than once (the tests) frees what each run leaves behind."""
    timer = _CollectionTimer()
    gc.callbacks.append(timer)
    if enabled:
        gc.collect()
        gc.freeze()

    def restore() -> None:
        gc.callbacks.remove(timer)
        if enabled:
            gc.unfreeze()

    return restore


class _CollectionTimer:
    """Adds each collection's duration to the request that was running when it happened."""

    def __init__(self) -> None:
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            add_server_timing("gc", time.perf_counter() - self.started)
