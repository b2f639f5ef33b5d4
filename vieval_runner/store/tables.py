"""Opening the store's Delta tables, with the format check and commit retry shared by all."""

from __future__ import annotations

import logging
import random
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
