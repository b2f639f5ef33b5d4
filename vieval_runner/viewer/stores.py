"""The viewer's handle on one store root: opened lazily, reads retried across commits.

Reads only through ``vieval_runner.store.open_store`` (never writes, never globs). A store
that does not exist yet is re-opened on the next poll; a read that races a concurrent commit is
refreshed and retried, then reported as ``StoreUnavailable`` so the caller can keep its last
good state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vieval_runner.viewer.analysis import clean

T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """A read failed (for example during a concurrent commit); the client may retry."""


class StoreHandle:
    """One store root, opened lazily and re-opened until its tables exist."""

    def __init__(
        self, root: str, index: int, label: str, storage_options: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.storage_options = storage_options  # object-store settings (never shown)
        self.index = index
        self.label = label
        self.reader: Any = None
        self.error: str | None = None
        self.lock = threading.RLock()

    def open(self) -> Any:
        """The store's reader, or None while the store does not exist yet (``error`` says why)."""
        from vieval_runner.store import open_store

        with self.lock:
            if self.reader is None:
                try:
                    self.reader = open_store(self.root, storage_options=self.storage_options)
                    self.error = None
                except Exception as exc:  # missing/empty store: the waiting state, not an error
                    self.error = f"{type(exc).__name__}: {exc}"
            return self.reader

    def read(self, fn: Callable[[Any], T], retries: int) -> T:
        """``fn(reader)``, refreshed and retried up to ``retries`` times; StoreUnavailable after."""
        last: Exception | None = None
        for attempt in range(retries):
            try:
                with self.lock:
                    return fn(self.reader)
            except Exception as exc:  # a commit racing the read: refresh and try again
                last = exc
                time.sleep(0.05 * (attempt + 1))
                try:
                    with self.lock:
                        self.reader.refresh()
                except Exception:
                    pass
        raise StoreUnavailable(f"store {self.root}: {type(last).__name__}: {last}") from last

    def refresh(self) -> None:
        """Open the store if it now exists and re-read its Delta logs; failures keep the old
        snapshot (the next poll tries again)."""
        if self.open() is None:
            return
        try:
            with self.lock:
                self.reader.refresh()
        except Exception:
            pass

    def version(self) -> Any:
        """The reader's table versions (JSON-safe), or None when closed or unreadable."""
        try:
            return clean(dict(self.reader.version)) if self.reader is not None else None
        except Exception:
            return None

    def describe(self) -> dict:
        """The store's entry in the meta document."""
        return {
            "root": self.root,
            "label": self.label,
            "open": self.reader is not None,
            "error": self.error,
            "version": self.version(),
        }


def store_labels(roots: list[str]) -> list[str]:
    """Short display names: each root's folder name, numbered when two would collide."""
    names = [Path(r.rstrip("/")).name or r for r in roots]
    if len(set(names)) == len(names):
        return names
    return [f"{n} [{i + 1}]" for i, n in enumerate(names)]


def open_handles(
    roots: list[str], storage_options: dict[str, str] | None = None
) -> list[StoreHandle]:
    """One (unopened) handle per root, labelled."""
    return [
        StoreHandle(r, i, lab, storage_options)
        for i, (r, lab) in enumerate(zip(roots, store_labels(roots), strict=True))
    ]
