"""Store upkeep for ``vieval compact STORE``: merge small files, then vacuum old ones."""

from __future__ import annotations

from vieval_runner.store.schema import TABLES, StoreError
from vieval_runner.store.tables import open_table, table_exists, with_retry


def compact(
    root: str,
    retention_hours: float = 168,
    force: bool = False,
    storage_options: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Compact every table and vacuum files unreferenced for ``retention_hours``.

    Versions older than the retention window can no longer be read afterwards (time travel
    ends there), so zero retention is refused unless ``force``. Returns per-table figures.
    """
    root = str(root)
    if retention_hours < 0 or (retention_hours == 0 and not force):
        raise StoreError(
            f"compact {root}: retention_hours={retention_hours} would delete the files of "
            "every earlier version (no time travel, and readers of them fail): pass "
            "force=True to do it anyway"
        )
    report: dict[str, dict] = {}
    for table in TABLES:
        if not table_exists(root, table, storage_options):
            continue

        def optimize(table: str = table) -> dict:
            return open_table(root, table, storage_options).optimize.compact()

        metrics = with_retry(optimize, f"compacting {table} in {root}")
        dt = open_table(root, table, storage_options)
        removed = dt.vacuum(
            retention_hours=int(retention_hours),
            dry_run=False,
            # the caller chose the window; the table default (7 days) would veto shorter ones
            enforce_retention_duration=False,
        )
        report[table] = {
            "files_added": metrics.get("numFilesAdded", 0),
            "files_removed": metrics.get("numFilesRemoved", 0),
            "files_vacuumed": len(removed),
            "version": dt.version(),
        }
    return report
