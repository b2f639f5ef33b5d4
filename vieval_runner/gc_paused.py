"""Cyclic garbage collection paused around CPU-bound batch work."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside the block (restored after, if it was on).

    Parsing, scoring or indexing a whole step allocates hundreds of thousands of small
    objects (boxes, dicts, lists) that reference counting frees; each allocation threshold
    they cross starts a collection that walks every tracked object of the process again (the
    store's rows, the specimens, every module); docs/benchmarks.md ("Scoring, rescoring and
    the store reads", issue 23) has what it saves. Cycles made inside the block are collected
    after it."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
