"""Python's cyclic garbage collector, set for a server whose requests build large batches.

Large requests (5000 upload URLs, a 10 x 1000 tree) allocate hundreds of thousands of
container objects that live until the response is written; with CPython's default threshold
(a young collection every 700 net allocations) each of them is traversed by several young
collections and the survivors again by full collections, which also walk every object
imported at start-up (schema, SQLAlchemy and botocore metadata: ~250,000 objects). That was
25-40 % of such requests. After start-up the long-lived objects are frozen (`gc.freeze`:
moved to a generation the collector never scans) and young collections run ~70 times less
often. Almost all garbage here is freed by reference counting at once; the collector only
finds cycles, whose memory waits a little longer with the higher threshold (bench/batches.py
shows the peak RSS either way). GC_TUNING=false keeps CPython's defaults, for comparison."""

from __future__ import annotations

import gc
from collections.abc import Callable

# (young, middle, old): a young collection per 50,000 net allocations, a middle one every 20
# young ones and a full one every 10 middle ones (CPython: 700, 10, 10).
THRESHOLDS = (50_000, 20, 10)


def tune_gc(enabled: bool) -> Callable[[], None]:
    """Called once everything long-lived exists (the end of the app's start-up); returns what
    undoes it at shutdown: the frozen objects go back to the collector and the thresholds are
    restored, so a process that runs the app more than once (the tests) frees what each run
    leaves behind."""
    if not enabled:
        return lambda: None
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)

    def restore() -> None:
        gc.set_threshold(*previous)
        gc.unfreeze()

    return restore
