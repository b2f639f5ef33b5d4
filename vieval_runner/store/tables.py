"""Opening the store's Delta tables, with the format check and commit retry shared by all."""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from typing import TypeVar

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from vieval_runner.objectstore import StorageOptionsError, check_options, explain
from vieval_runner.store.schema import (
    FORMAT_KEY,
    FORMAT_VERSION,
    PARTITIONS,
    SCHEMAS,
    StoreError,
    StoreFull,
    check_format,
    table_uri,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# Substrings of delta-rs errors that mean "someone else committed first": worth retrying.
_CONFLICT_WORDS = ("conflict", "concurrent", "already exists", "version mismatch")


def is_conflict(exc: BaseException) -> bool:
    """True for commit races that a retry on a fresh snapshot can resolve."""
    if isinstance(exc, CommitFailedError):
        return True
    return isinstance(exc, DeltaError) and any(w in str(exc).lower() for w in _CONFLICT_WORDS)


def with_retry(fn: Callable[[], T], what: str, attempts: int = 12, base_s: float = 0.05) -> T:
    """Run ``fn`` (which must reload its table) retrying commit conflicts.

    delta-rs does not retry a conflicting commit itself; exponential backoff with jitter
    keeps concurrent writers (ranks, nodes) from colliding again in lockstep.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except StorageOptionsError as exc:
            raise StoreError(f"{what}: {exc}") from None
        except OSError as exc:  # object storage: unreachable, access denied, no bucket
            raise StoreError(explain(exc, what)) from None
        except DeltaError as exc:
            if not is_conflict(exc):
                raise
            if attempt == attempts - 1:
                raise StoreError(
                    f"{what}: commit still conflicting after {attempts} tries: {exc}"
                ) from exc
            log.info("%s: commit conflict (try %d), retrying: %s", what, attempt + 1, exc)
            time.sleep(min(2.0, base_s * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def open_table(
    root: str,
    table: str,
    storage_options: dict[str, str] | None = None,
    version: int | None = None,
) -> DeltaTable:
    """One store table, format-checked; StoreError naming the path if absent or too new."""
    uri = table_uri(root, table)
    try:
        storage_options = check_options(storage_options)
        dt = DeltaTable(uri, version=version, storage_options=storage_options)
    except TableNotFoundError:
        raise StoreError(f"{root} is not a vieval store: no Delta table at {uri}") from None
    except StorageOptionsError as exc:
        raise StoreError(f"{root}: {exc}") from None
    except OSError as exc:  # object storage: unreachable, access denied, no bucket
        raise StoreError(explain(exc, uri, storage_options)) from None
    except DeltaError as exc:
        raise StoreError(
            f"cannot open {uri}"
            + (f" at version {version}" if version is not None else "")
            + f": {exc}"
        ) from None
    check_format(dt.metadata().configuration, uri)
    return dt


def table_exists(root: str, table: str, storage_options: dict[str, str] | None = None) -> bool:
    uri = table_uri(root, table)
    try:
        options = check_options(storage_options)
        return DeltaTable.is_deltatable(uri, storage_options=options)
    except StorageOptionsError as exc:
        raise StoreError(f"{root}: {exc}") from None
    except OSError as exc:  # object storage: unreachable, access denied, no bucket
        raise StoreError(explain(exc, uri, storage_options)) from None


def create_table(root: str, table: str, storage_options: dict[str, str] | None = None) -> None:
    """Create one table with the current schema and format version unless it exists."""

    def create() -> None:
        if table_exists(root, table, storage_options):
            open_table(root, table, storage_options)  # format check of an existing table
            return
        DeltaTable.create(
            table_uri(root, table),
            SCHEMAS[table],
            mode="ignore",
            partition_by=PARTITIONS.get(table),
            configuration={FORMAT_KEY: FORMAT_VERSION},
            storage_options=storage_options,
            # delta-rs only knows delta.* keys unless told custom properties are fine
            raise_if_key_not_exists=False,
        )

    with_retry(create, f"creating {table_uri(root, table)}")


def arrow_schema(dt: DeltaTable) -> pa.Schema:
    return pa.schema(dt.schema().to_arrow())


def fit_to_table(data: pa.Table, dt: DeltaTable) -> tuple[pa.Table, str | None]:
    """Pad ``data`` with the table's extra columns; ask for a schema merge for new ones."""
    existing = arrow_schema(dt)
    for f in existing:
        if f.name not in data.column_names:
            data = data.append_column(f.name, pa.nulls(data.num_rows, f.type))
    new = [n for n in data.column_names if n not in existing.names]
    return data, ("merge" if new else None)


# What delta-rs / object_store / the OS say when a write finds no room (errno 28 and 122).
_FULL_WORDS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# Room kept for what a step's commit writes besides its rows (Parquet footers, the Delta log
# entry with file statistics, the evaluation row's commit, the run's log lines).
COMMIT_RESERVE_BYTES = 1 << 20


def is_disk_full(exc: BaseException) -> bool:
    """True for a write that failed because the disk or the quota is full (ENOSPC/EDQUOT)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(w in str(exc).lower() for w in _FULL_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(root: str) -> int | None:
    """Bytes free on the filesystem of a local store (its nearest existing folder); None for
    object storage or when the filesystem does not say."""
    if "://" in root and not root.startswith("file://"):
        return None
    path = os.path.abspath(root.removeprefix("file://"))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def ensure_space(
    root: str, what: str, data_bytes: int, reserve: int = COMMIT_RESERVE_BYTES
) -> None:
    """StoreFull before writing ``data_bytes`` (plus ``reserve``) to a local store whose disk
    has less room: refusing up front leaves no half-written files, and delta-rs never meets
    ENOSPC mid-write (where object_store panics: arrow-rs-object-store #810)."""
    needed = data_bytes + reserve
    free = free_bytes(root)
    if free is not None and free < needed:
        raise StoreFull(root, what, needed, free, "No space left on device")


def writing(
    root: str, what: str, data_bytes: int, fn: Callable[[], T], reserve: int = COMMIT_RESERVE_BYTES
) -> T:
    """``ensure_space`` then ``fn()`` (a write with its own retry); a write that still meets a
    full disk raises StoreFull naming the store, the write and the space it needed."""
    ensure_space(root, what, data_bytes, reserve)
    try:
        return fn()
    except StoreFull:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        detail = "No space left on device" if "quota" not in str(exc).lower() else "quota full"
        needed = data_bytes + reserve
        raise StoreFull(root, what, needed, free_bytes(root), detail) from exc
