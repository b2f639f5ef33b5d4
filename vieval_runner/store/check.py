"""``vieval check STORE``: what the commit protocol left behind (docs/store.md).

Readers ignore orphans on their own; this says where they are, so a user knows which steps
an unfinished commit touched and that the next run of them cleans them up.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
from deltalake import QueryBuilder

from vieval_runner.store.commits import has_rows, markers
from vieval_runner.store.schema import PREDICTIONS, sql_str
from vieval_runner.store.tables import open_table
from vieval_runner.store.writer import Options, stored_evaluations


def _groups(root: str, run_id: str | None, options: Options) -> list[dict]:
    """(run_id, step, eval_id, rows) of the predictions table's latest version."""
    where = "" if run_id is None else f" WHERE run_id = {sql_str(run_id)}"
    sql = (
        "SELECT run_id, step, eval_id, COUNT(*) AS rows FROM predictions"
        f"{where} GROUP BY run_id, step, eval_id"
    )
    dt = open_table(root, PREDICTIONS, options)
    return pa.table(QueryBuilder().register("predictions", dt).execute(sql)).to_pylist()


def _orphans(groups: Iterable[dict], evaluations: list[dict]) -> list[dict]:
    marks = markers(evaluations)
    by_id = {e["eval_id"]: e for e in evaluations if e.get("eval_id")}
    found = []
    for g in groups:
        marker = marks.get((g["run_id"], g["step"]))
        if marker is not None and marker["eval_id"] == g["eval_id"]:
            continue
        own = by_id.get(g["eval_id"])
        if own is None:
            why = "no evaluation row: its writer stopped (killed, crashed, out of disk) between the two commits"
        elif own.get("status") != "ok":
            why = f"its evaluation failed: {own.get('error') or 'unknown error'}"
        else:
            why = "superseded by a later evaluation of the step"
        found.append({**g, "why": why})
    return sorted(found, key=lambda o: (o["run_id"], o["step"]))


def orphaned_steps(root: str, run_id: str, storage_options: Options = None) -> set[int]:
    """Steps of ``run_id`` holding orphan prediction rows: a run evaluates them again (even
    when an older evaluation of the step is stored), which replaces the orphans."""
    groups = _groups(str(root), run_id, storage_options)
    return {o["step"] for o in _orphans(groups, stored_evaluations(str(root), storage_options))}


def check_store(root: str, storage_options: Options = None) -> dict:
    """The store's commit state: ``committed`` steps, ``orphans`` (prediction rows no
    evaluation row committed; readers ignore them), ``replaced`` (committed steps whose rows
    an unfinished later commit replaced: readers read them at the version their evaluation
    recorded) and ``lost`` (committed steps whose rows cannot be read any more)."""
    root = str(root)
    evaluations = stored_evaluations(root, storage_options)
    groups = _groups(root, None, storage_options)
    present = {(g["run_id"], g["step"], g["eval_id"]) for g in groups}
    replaced, lost = [], []
    marks = markers(evaluations)
    for (run, step), marker in sorted(marks.items()):
        if (run, step, marker["eval_id"]) in present or not has_rows(marker):
            continue
        entry = {"run_id": run, "step": step, "eval_id": marker["eval_id"],
                 "predictions_version": marker.get("predictions_version")}  # fmt: skip
        (replaced if _readable_at(root, entry, storage_options) else lost).append(entry)
    return {
        "store": root,
        "committed": len(marks),
        "orphans": _orphans(groups, evaluations),
        "replaced": replaced,
        "lost": lost,
    }


def _readable_at(root: str, entry: dict, options: Options) -> bool:
    version = entry["predictions_version"]
    if version is None:
        return False
    try:
        dt = open_table(root, PREDICTIONS, options, version=version)
        sql = f"SELECT 1 FROM p WHERE eval_id = {sql_str(entry['eval_id'])} LIMIT 1"
        return pa.table(QueryBuilder().register("p", dt).execute(sql)).num_rows > 0
    except Exception:  # vacuumed past its retention, or unreadable
        return False
