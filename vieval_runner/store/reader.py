"""Reading the store: the viewer's and notebooks' API, fast on repeated clicks.

Everything goes through the Delta log with delta-rs's own query engine; never
``DeltaTable.to_pyarrow_table()`` (it aborts the interpreter at exit) and never a folder glob
(replaced files stay on disk until vacuum).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, QueryBuilder

from vieval_runner.objectstore import scrub
from vieval_runner.store.commits import has_rows, markers, predictions_at
from vieval_runner.store.schema import (
    EVALUATIONS,
    EVALUATIONS_SCHEMA,
    PREDICTIONS,
    PREDICTIONS_SCHEMA,
    SPECIMENS,
    SPECIMENS_SCHEMA,
    TRAINING_LOG,
    TRAINING_LOG_SCHEMA,
    StoreError,
    conform,
    sql_str,
    to_timestamp,
)
from vieval_runner.store.tables import open_table, table_exists

AsOf = int | str | datetime | None
_SCHEMAS = {
    SPECIMENS: SPECIMENS_SCHEMA,
    PREDICTIONS: PREDICTIONS_SCHEMA,
    EVALUATIONS: EVALUATIONS_SCHEMA,
    TRAINING_LOG: TRAINING_LOG_SCHEMA,
}


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    """Serialise a reader method: the viewer may call one reader from several threads."""

    @functools.wraps(method)
    def wrapper(self: StoreReader, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def open_store(
    root: str,
    as_of: AsOf = None,
    storage_options: dict[str, str] | None = None,
    cache_bytes: int = 2 << 30,
) -> StoreReader:
    """Open a store for reading, optionally as of a predictions version or a timestamp.

    Raises StoreError if ``root`` is not a store, was written by a newer major format, or
    ``as_of`` is outside the table's (vacuumed) history.
    """
    return StoreReader(str(root), as_of, storage_options, cache_bytes)


class StoreReader:
    """A snapshot of a store; ``refresh()`` moves it to the latest commits (unless pinned)."""

    def __init__(
        self, root: str, as_of: AsOf, storage_options: dict[str, str] | None, cache_bytes: int
    ) -> None:
        self.root = root
        self._lock = threading.RLock()
        self._options = storage_options
        self._cache_bytes = cache_bytes
        self._pinned = as_of is not None
        self._tables: dict[str, DeltaTable] = {}
        for name in _SCHEMAS:
            # An older store may lack a table (training_log came later): it reads as empty.
            if name == PREDICTIONS or table_exists(root, name, storage_options):
                self._tables[name] = open_table(root, name, storage_options)
        self._as_of_time: datetime | None = None
        if as_of is not None:
            self._pin(as_of)
        self._images: OrderedDict[tuple[str, str | None], bytes | None] = OrderedDict()
        self._steps: OrderedDict[tuple[str, int], tuple[tuple, pa.Table]] = OrderedDict()
        self._histories: dict[str, tuple[tuple, pa.Table | None, dict, list[int]]] = {}
        self._reset_derived()

    def _pin(self, as_of: int | str | datetime) -> None:
        preds = self._tables[PREDICTIONS]
        if isinstance(as_of, str) and as_of.strip().lstrip("-").isdigit():
            as_of = int(as_of)
        if isinstance(as_of, str | datetime):  # ISO strings; naive times are taken as UTC
            as_of = to_timestamp(as_of, f"as_of for {self.root}")
        try:
            preds.load_as_version(as_of)
        except Exception as exc:  # delta-rs raises several types for unknown versions/times
            raise StoreError(
                f"{self.root}: cannot read predictions as of {as_of!r}: "
                f"{scrub(str(exc), self._options)}"
            ) from None
        if isinstance(as_of, datetime):
            self._as_of_time = as_of
        else:
            # history() of a time-travelled handle mislabels versions: ask a latest one
            latest = open_table(self.root, PREDICTIONS, self._options)
            history = latest.history(limit=max(1, latest.version() - as_of + 1))
            commit = next((h for h in history if h.get("version") == as_of), None)
            ms = commit["timestamp"] if commit else None
            self._as_of_time = datetime.fromtimestamp(ms / 1000, UTC) if ms else None

    def _reset_derived(self) -> None:
        self._qb: QueryBuilder | None = None
        self._files: dict[int, tuple] | None = None
        self._runs: list[str] | None = None
        self._evals: pa.Table | None = None
        self._committed: dict[str, dict[int, dict]] | None = None
        self._images.clear()

    # ---- low level ------------------------------------------------------------------------

    @property
    def version(self) -> dict[str, int]:
        """The version of each table this reader sees."""
        return {name: dt.version() for name, dt in self._tables.items()}

    @_locked
    def refresh(self) -> bool:
        """Re-read the Delta logs; True if anything changed. A pinned reader never moves."""
        if self._pinned:
            return False
        before = self.version
        for name in _SCHEMAS:
            if name in self._tables:
                self._tables[name].update_incremental()
            elif table_exists(self.root, name, self._options):
                self._tables[name] = open_table(self.root, name, self._options)
        changed = self.version != before
        if changed:
            self._reset_derived()  # cached steps are re-validated by their file lists
        return changed

    def _sql(self, table: str, sql: str) -> pa.Table:
        """Run ``sql`` (table names as in the store) through delta-rs's engine."""
        if table not in self._tables:
            return SCHEMAS_EMPTY[table]
        if self._qb is None:
            self._qb = QueryBuilder()
            for name, dt in self._tables.items():
                self._qb.register(name, dt)
        try:
            result = pa.table(self._qb.execute(sql))
        except Exception as exc:  # e.g. a pinned version whose files vacuum removed
            raise StoreError(
                f"{self.root}: reading {table} at version {self._tables[table].version()} "
                f"failed (were its files vacuumed?): "
                f"{scrub(str(exc), self._options)}"
            ) from None
        return conform(result, _SCHEMAS[table])

    def _step_files(self) -> dict[int, tuple]:
        """step -> the data files that hold it (changes iff the step's contents changed)."""
        if self._files is None:
            actions = pa.table(self._tables[PREDICTIONS].get_add_actions(flatten=True))
            steps = actions.column("partition.step").to_pylist()
            paths = actions.column("path").to_pylist()
            files: dict[int, list] = {}
            for step, path in zip(steps, paths, strict=True):
                files.setdefault(step, []).append(path)
            self._files = {s: tuple(sorted(p)) for s, p in files.items()}
        return self._files

    # ---- runs and steps -------------------------------------------------------------------

    @_locked
    def runs(self) -> list[str]:
        """Every run with an evaluation row (failed ones included), sorted. Predictions with
        no evaluation row (an unfinished commit's orphans) make no run."""
        if self._runs is None:
            found = set(self.evaluations().column("run_id").to_pylist())
            self._runs = sorted(r for r in found if r is not None)
        return list(self._runs)

    @_locked
    def committed(self, run_id: str) -> dict[int, dict]:
        """``step -> marker``: the run's committed steps, each with the evaluation row that
        committed it (its latest ok one). Every reader of steps goes through this."""
        return dict(self._markers(run_id))

    def _markers(self, run_id: str) -> dict[int, dict]:
        """``committed(run_id)`` without the copy (callers only read it)."""
        if self._committed is None:
            self._committed = {}
            for (run, step), row in markers(self.evaluations().to_pylist()).items():
                self._committed.setdefault(run, {})[step] = row
        return self._committed.get(run_id, {})

    @_locked
    def steps(self, run_id: str) -> list[int]:
        """Committed steps of ``run_id`` that hold predictions, ascending (a step counts once
        its ok evaluation row is stored; one of an empty split holds none)."""
        return sorted(s for s, m in self.committed(run_id).items() if has_rows(m))

    @_locked
    def step(self, run_id: str, step: int) -> pa.Table:
        """All specimens' predictions of one run at one committed step, sorted by
        specimen_id (cached): exactly the rows its marker committed; empty if uncommitted."""
        key = (run_id, int(step))
        marker = self._markers(run_id).get(int(step))
        if marker is None:
            return PREDICTIONS_EMPTY
        signature = (self._step_files().get(int(step), ()), marker["eval_id"])
        hit = self._steps.get(key)
        if hit is not None and hit[0] == signature:
            self._steps.move_to_end(key)
            return hit[1]
        table = self._marker_rows(run_id, int(step), marker)
        table = table.take(pc.sort_indices(table, [("specimen_id", "ascending")]))
        self._steps[key] = (signature, table)
        self._evict()
        return table

    def _marker_rows(self, run_id: str, step: int, marker: dict) -> pa.Table:
        """The rows ``marker`` committed: in the version read, or (when an unfinished later
        commit replaced them) in the predictions version the marker recorded."""
        sql = (
            f"SELECT * FROM predictions WHERE step = {step} AND run_id = {sql_str(run_id)} "
            f"AND eval_id = {sql_str(marker['eval_id'])}"
        )
        table = self._sql(PREDICTIONS, sql)
        version = marker.get("predictions_version")
        if table.num_rows or not has_rows(marker) or version is None:
            return table
        if version == self._tables[PREDICTIONS].version():
            return table
        return predictions_at(self.root, self._options, version, sql, f"step {step} of {run_id!r}")

    def _evict(self) -> None:
        total = sum(t.nbytes for _, t in self._steps.values())
        while total > self._cache_bytes and len(self._steps) > 1:
            _, (_, table) = self._steps.popitem(last=False)
            total -= table.nbytes

    @_locked
    def specimen_history(self, run_id: str, specimen_id: str) -> pa.Table:
        """One specimen's predictions at every step of a run, ascending by step.

        The first call loads the whole run sorted by (specimen, step) in one query and
        indexes it (a one-specimen query across a step-partitioned table is slow, and the
        viewer asks on every click); later calls are a zero-copy slice. A run too big for the
        cache is queried per call instead.
        """
        files = self._step_files()
        committed = self._markers(run_id)
        signature = tuple((s, files.get(s, ()), m["eval_id"]) for s, m in sorted(committed.items()))
        hit = self._histories.get(run_id)
        if hit is None or hit[0] != signature:
            self._histories.pop(run_id, None)  # free the stale copy before loading anew
            hit = (signature, *self._index_run(run_id))
            self._histories[run_id] = hit
        _, table, index, replaced = hit
        if table is None:  # too big to hold: one query per call
            sql = (
                f"SELECT * FROM predictions WHERE {self._committed_rows(run_id)} "
                f"AND specimen_id = {sql_str(specimen_id)} ORDER BY step"
            )
            parts = [self._sql(PREDICTIONS, sql)]
            for step in replaced:
                rows = self.step(run_id, step)
                parts.append(rows.filter(pc.equal(rows.column("specimen_id"), specimen_id)))
            return _by_specimen_step(_concat(parts)) if replaced else parts[0]
        start, length = index.get(specimen_id, (0, 0))
        return table.slice(start, length)

    def _committed_rows(self, run_id: str) -> str:
        """SQL condition: the run's rows that its markers committed (orphans left out)."""
        ids = [m["eval_id"] for m in self.committed(run_id).values()] or [""]
        return f"run_id = {sql_str(run_id)} AND eval_id IN ({', '.join(map(sql_str, ids))})"

    def _index_run(
        self, run_id: str
    ) -> tuple[pa.Table | None, dict[str, tuple[int, int]], list[int]]:
        sql = (
            f"SELECT * FROM predictions WHERE {self._committed_rows(run_id)} "
            "ORDER BY specimen_id, step"
        )
        table = self._sql(PREDICTIONS, sql)
        # steps whose marker's rows an unfinished later commit replaced: read where they are
        present = set(pc.unique(table.column("step")).to_pylist())
        replaced = [
            s for s, m in sorted(self.committed(run_id).items()) if s not in present and has_rows(m)
        ]
        if replaced:
            table = _by_specimen_step(_concat([table, *(self.step(run_id, s) for s in replaced)]))
        held = sum(t.nbytes for _, t, _, _ in self._histories.values() if t is not None)
        if held + table.nbytes > self._cache_bytes // 2:
            return None, {}, replaced
        # Sorted, so each specimen's rows are contiguous: index run boundaries only.
        ids = table.column("specimen_id")
        n = len(ids)
        if n == 0:
            return table, {}, replaced
        changes = pc.indices_nonzero(pc.not_equal(ids.slice(1), ids.slice(0, n - 1)))
        starts = [0, *(i + 1 for i in changes.to_pylist())]
        ends = [*starts[1:], n]
        names = ids.take(pa.array(starts, pa.int64())).to_pylist()
        index = {k: (a, b - a) for k, a, b in zip(names, starts, ends, strict=True)}
        return table, index, replaced

    # ---- evaluations ----------------------------------------------------------------------

    @_locked
    def evaluations(self, run_id: str | None = None) -> pa.Table:
        """Every evaluation (failed included), oldest first; ``as_of`` hides later ones."""
        if self._evals is None:
            table = self._sql(EVALUATIONS, "SELECT * FROM evaluations")
            if self._as_of_time is not None:
                keep = pc.less_equal(
                    table.column("finished_at"),
                    pa.scalar(self._as_of_time, pa.timestamp("us", tz="UTC")),
                )
                table = table.filter(pc.fill_null(keep, True))
            if self._pinned:  # and evaluations whose predictions came after the pinned version
                pinned = self._tables[PREDICTIONS].version()
                keep = pc.less_equal(table.column("predictions_version"), pinned)
                table = table.filter(pc.fill_null(keep, True))
            order = pc.sort_indices(table, [("finished_at", "ascending", "at_start")])
            self._evals = table.take(order)
        if run_id is None:
            return self._evals
        return self._evals.filter(pc.equal(self._evals.column("run_id"), run_id))

    @_locked
    def aggregates(self, run_id: str) -> pa.Table:
        """One row per committed step, ascending: its marker (the latest ok evaluation)."""
        evals = self.evaluations(run_id)
        position = {e: i for i, e in enumerate(evals.column("eval_id").to_pylist())}
        rows = [position[m["eval_id"]] for _, m in sorted(self.committed(run_id).items())]
        return evals.take(pa.array(rows, pa.int64()))

    # ---- specimens and training log -------------------------------------------------------

    @_locked
    def specimens(self, with_images: bool = False, dataset_version: str | None = None) -> pa.Table:
        """Stored specimens (all dataset versions unless one is named), by specimen_id."""
        cols = [n for n in SPECIMENS_SCHEMA.names if with_images or n != "image_bytes"]
        present = self._present(SPECIMENS, cols)
        where = (
            ""
            if dataset_version is None
            else f" WHERE dataset_version = {sql_str(dataset_version)}"
        )
        table = self._sql(SPECIMENS, f"SELECT {present} FROM specimens{where}")
        if not with_images:
            table = table.drop_columns(["image_bytes"])
        return table.take(
            pc.sort_indices(table, [("specimen_id", "ascending"), ("dataset_version", "ascending")])
        )

    def _present(self, table: str, cols: list[str]) -> str:
        if table not in self._tables:
            return "*"
        have = set(pa.schema(self._tables[table].schema().to_arrow()).names)
        return ", ".join(f'"{c}"' for c in cols if c in have)

    @_locked
    def specimen_image(self, specimen_id: str, dataset_version: str | None = None) -> bytes | None:
        """The stored JPEG thumbnail of one specimen (newest dataset version if not named)."""
        key = (specimen_id, dataset_version)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        where = f"specimen_id = {sql_str(specimen_id)}"
        if dataset_version is not None:
            where += f" AND dataset_version = {sql_str(dataset_version)}"
        sql = f"SELECT image_bytes, written_at FROM specimens WHERE {where} ORDER BY written_at"
        got = self._sql(SPECIMENS, sql).column("image_bytes").to_pylist()
        image = got[-1] if got else None
        self._images[key] = image
        if len(self._images) > 512:
            self._images.popitem(last=False)
        return image

    @_locked
    def training_log(self, run_id: str) -> pa.Table:
        """The run's Trainer log history (loss curves), ascending by step."""
        sql = f"SELECT * FROM training_log WHERE run_id = {sql_str(run_id)} ORDER BY step"
        return self._sql(TRAINING_LOG, sql)


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Rows of different versions (a later one may hold extra columns) as one table."""
    return pa.concat_tables(tables, promote_options="default")


def _by_specimen_step(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, [("specimen_id", "ascending"), ("step", "ascending")]))


SCHEMAS_EMPTY = {name: schema.empty_table() for name, schema in _SCHEMAS.items()}
PREDICTIONS_EMPTY = SCHEMAS_EMPTY[PREDICTIONS]
