"""Pausing Python's cyclic garbage collector over bulk work.

A big tree allocates hundreds of thousands of short-lived objects (rows, masks, completed
dicts) that are freed by reference counting, never by the collector; yet each allocation
burst triggers collections that walk every live object, so a 10 x 10,000 tree spent most of
its time in the collector. Bulk sections run with it paused. Pauses nest and may span an
await (another request's section may overlap): the collector resumes when the last one ends,
and only if it was running when the first began."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0
_resume = False


@contextmanager
def collector_paused() -> Iterator[None]:
    global _depth, _resume
    if _depth == 0:
        _resume = gc.isenabled()
        gc.disable()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _resume:
            gc.enable()
