"""Writing the store: tables, specimens, one atomic commit per evaluated step, training logs."""

from __future__ import annotations

import functools
import io
import json
import uuid
from collections.abc import Mapping, Sequence

import pyarrow as pa
from deltalake import WriterProperties, write_deltalake

from vieval_runner.records import Prediction, Specimen
from vieval_runner.store.commits import pause_point
from vieval_runner.store.schema import (
    EVALUATIONS,
    EVALUATIONS_SCHEMA,
    PREDICTIONS,
    PREDICTIONS_SCHEMA,
    SPECIMENS,
    SPECIMENS_SCHEMA,
    TABLES,
    TRAINING_LOG,
    TRAINING_LOG_SCHEMA,
    StoreError,
    config_hash,
    now_utc,
    rows_to_table,
    sql_str,
)
from vieval_runner.store.tables import (
    COMMIT_RESERVE_BYTES,
    create_table,
    fit_to_table,
    open_table,
    table_exists,
    with_retry,
    writing,
)

Options = dict[str, str] | None

# Small row groups in the specimens table so one image lookup reads one small group.
_SPECIMEN_WRITER = WriterProperties(max_row_group_size=128)


def create_store(root: str, storage_options: Options = None) -> None:
    """Create every table that is missing (idempotent; call before writers start)."""
    from concurrent.futures import ThreadPoolExecutor

    # one thread per table: delta-rs creates without the GIL, so a new store takes half the time
    def create(table: str) -> None:
        if table_exists(str(root), table, storage_options):
            open_table(str(root), table, storage_options)  # its format check; nothing to write
            return
        what = f"creating table {table}"
        writing(str(root), what, 0, lambda: create_table(str(root), table, storage_options))

    with ThreadPoolExecutor(len(TABLES), thread_name_prefix="vieval-create-store") as pool:
        list(pool.map(create, TABLES))


def _overwrite(
    root: str,
    table: str,
    data: pa.Table,
    predicate: str,
    storage_options: Options,
    writer_properties: WriterProperties | None = None,
    what: str | None = None,
) -> int:
    """One predicate-overwrite commit, retried on conflict; returns the committed version.
    ``what``: the write as an error message names it."""

    def attempt() -> int:
        dt = open_table(root, table, storage_options)  # fresh snapshot on every try
        fitted, schema_mode = fit_to_table(data, dt)
        write_deltalake(
            dt,
            fitted,
            mode="overwrite",
            predicate=predicate,
            schema_mode=schema_mode,
            writer_properties=writer_properties,
        )
        return dt.version()

    what = what or f"writing {table} where {predicate}"
    return writing(root, what, data.nbytes, lambda: with_retry(attempt, f"{what} in {root}"))


def _append(
    root: str,
    table: str,
    data: pa.Table,
    storage_options: Options,
    what: str | None = None,
    reserve: int = COMMIT_RESERVE_BYTES,
) -> int:
    def attempt() -> int:
        dt = open_table(root, table, storage_options)
        fitted, schema_mode = fit_to_table(data, dt)
        write_deltalake(dt, fitted, mode="append", schema_mode=schema_mode)
        return dt.version()

    what = what or f"appending to {table}"
    retried = functools.partial(with_retry, attempt, f"{what} in {root}")
    return writing(root, what, data.nbytes, retried, reserve)


def _eval_defaults(eval_row: Mapping, status: str) -> dict:
    from vieval_runner.version import __version__

    row = dict(eval_row)
    run_id, step = row.get("run_id"), row.get("step")
    if not isinstance(run_id, str) or not run_id:
        raise StoreError(f"evaluation row needs a non-empty string run_id, got {run_id!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise StoreError(f"evaluation row for run {run_id!r} needs an int step >= 0, got {step!r}")
    row.setdefault("eval_id", None)
    row["eval_id"] = row["eval_id"] or uuid.uuid4().hex
    row["status"] = status
    row.setdefault("finished_at", now_utc())
    row.setdefault("started_at", row["finished_at"])
    row.setdefault("vieval_version", __version__)
    if row.get("config_hash") is None:
        row["config_hash"] = config_hash(row.get("config"))
    return row


def _prediction_rows(ev: dict, prediction_rows: Sequence[Mapping]) -> list[dict]:
    where = f"run {ev['run_id']!r} step {ev['step']}"
    rows, seen = [], set()
    for i, given in enumerate(prediction_rows):
        row = dict(given)
        for key in ("run_id", "step", "eval_id"):
            if row.get(key) is None:
                row[key] = ev[key]
            elif row[key] != ev[key]:
                raise StoreError(
                    f"prediction row {i} of {where}: {key} {row[key]!r} differs from the "
                    f"evaluation's {ev[key]!r}"
                )
        sid = row.get("specimen_id")
        if not isinstance(sid, str) or not sid:
            raise StoreError(f"prediction row {i} of {where}: missing specimen_id")
        if sid in seen:
            raise StoreError(f"prediction row {i} of {where}: duplicate specimen_id {sid!r}")
        seen.add(sid)
        size = row.pop("input_size", None)  # Prediction.input_size -> the two stored columns
        if size is not None:
            row.setdefault("input_width", size[0])
            row.setdefault("input_height", size[1])
        rows.append(row)
    return rows


def prediction_row(prediction: Prediction) -> dict:
    """A ``Prediction`` record as a predictions-table row (metrics flattened to columns)."""
    row = {
        "specimen_id": prediction.specimen_id,
        "raw_text": prediction.raw_text,
        "parse_status": prediction.parse_status,
        "pred_boxes": [b.to_row() for b in prediction.pred_boxes],
        "pred_answer": prediction.pred_answer,
        "failure_category": prediction.failure_category or None,
        **prediction.metrics,
    }
    if prediction.input_size is not None:
        row["input_width"], row["input_height"] = prediction.input_size
    row["confidence"] = prediction.confidence
    row["token_logprobs"] = prediction.token_logprobs
    row["token_ends"] = prediction.token_ends
    row["truncated"] = prediction.truncated
    return row


def commit_step(
    root: str,
    eval_row: Mapping,
    prediction_rows: Sequence[Mapping],
    storage_options: Options = None,
) -> int:
    """Commit one evaluated (run, step): its predictions, then its evaluation row.

    1. predictions: ONE predicate-overwrite commit replaces the (run, step)'s rows (orphans
       of an unfinished earlier commit included) with rows carrying this ``eval_id``;
    2. evaluations: ONE append of the evaluation row, with ``predictions_version`` = the
       version of commit 1. This row is the step's commit marker.

    Readers show a step only once its marker is committed, and then exactly the marker's
    predictions, so a writer killed (or out of disk) between 1 and 2 leaves orphan rows that
    every reader ignores, ``vieval check`` reports and the next commit of the step replaces.
    Returns the new predictions table version. StoreFull when the disk is full.
    """
    return commit_steps(root, [(eval_row, prediction_rows)], storage_options)


def commit_steps(
    root: str,
    steps: Sequence[tuple[Mapping, Sequence[Mapping]]],
    storage_options: Options = None,
) -> int:
    """Commit several evaluated (run, step)s with `commit_step`'s protocol in two commits in
    all: ONE predicate-overwrite of all their predictions, then ONE append of their
    evaluation rows, each marker carrying that version (`vieval rescore` commits many steps
    so: a commit costs about the same for one step as for ten). Returns the version."""
    root = str(root)
    evs, tables, seen = [], [], set()
    for eval_row, prediction_rows in steps:
        ev = _eval_defaults(eval_row, status=eval_row.get("status") or "ok")
        if (ev["run_id"], ev["step"]) in seen:
            raise StoreError(f"step {ev['step']} of run {ev['run_id']!r} twice in one commit")
        seen.add((ev["run_id"], ev["step"]))
        if ev.get("n_specimens") is None:
            ev["n_specimens"] = len(prediction_rows)
        rows = _prediction_rows(ev, prediction_rows)
        where = f"predictions of run {ev['run_id']!r} step {ev['step']}"
        tables.append(rows_to_table(rows, PREDICTIONS_SCHEMA, where))
        evs.append(ev)
    if not evs:
        raise StoreError("commit_steps: nothing to commit")
    data = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    by_run: dict[str, list[int]] = {}
    for ev in evs:
        by_run.setdefault(ev["run_id"], []).append(int(ev["step"]))
    predicate = " OR ".join(
        f"(run_id = {sql_str(run)} AND step IN ({', '.join(map(str, sorted(steps)))}))"
        for run, steps in by_run.items()
    )
    if len(evs) == 1:
        predicate = f"run_id = {sql_str(evs[0]['run_id'])} AND step = {int(evs[0]['step'])}"
    step = ", ".join(f"step {ev['step']} of run {ev['run_id']!r}" for ev in evs[:3])
    step += f" and {len(evs) - 3} more" if len(evs) > 3 else ""
    pause_point("before-predictions")
    version = _overwrite(
        root, PREDICTIONS, data, predicate, storage_options, what=f"committing {step}"
    )
    pause_point("between")
    for ev in evs:
        ev["predictions_version"] = version
    marker = rows_to_table(evs, EVALUATIONS_SCHEMA, "evaluation")
    # the predictions write checked room for these rows too (the reserve): no second margin
    what = f"committing {step} (evaluation row{'s' if len(evs) > 1 else ''})"
    _append(root, EVALUATIONS, marker, storage_options, what=what, reserve=0)
    pause_point("after-evaluation")
    return version


def record_failed_evaluation(root: str, eval_row: Mapping, storage_options: Options = None) -> None:
    """Log a failed evaluation (status ``failed`` + ``error``); stored predictions stay."""
    ev = _eval_defaults(eval_row, status="failed")
    if not ev.get("error"):
        ev["error"] = "unknown error"
    data = rows_to_table([ev], EVALUATIONS_SCHEMA, f"failed evaluation of run {ev['run_id']!r}")
    _append(str(root), EVALUATIONS, data, storage_options)


def _thumbnail(specimen: Specimen, thumb_px: int) -> tuple[bytes, int, int]:
    from PIL import Image

    img = specimen.load_image()  # a DataError names the specimen and its file
    img.thumbnail((thumb_px, thumb_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), img.width, img.height


def has_dataset_version(root: str, dataset_version: str, storage_options: Options = None) -> bool:
    """Whether specimens of that dataset version are already stored."""
    from deltalake import QueryBuilder

    dt = open_table(str(root), SPECIMENS, storage_options)
    sql = f"SELECT 1 FROM s WHERE dataset_version = {sql_str(dataset_version)} LIMIT 1"
    return pa.table(QueryBuilder().register("s", dt).execute(sql)).num_rows > 0


def write_specimens(
    root: str,
    specimens: Sequence[Specimen],
    dataset_version: str,
    thumb_px: int = 768,
    storage_options: Options = None,
    warnings: Sequence[str] = (),
) -> bool:
    """Store the split once per dataset version, with a JPEG thumbnail (longest side
    ``thumb_px``) so the store is portable; ``warnings`` (the loader's changes to the ground
    truth) go on the version's first row. Returns False if that version was present."""
    root = str(root)
    if thumb_px < 1:
        raise StoreError(f"thumb_px must be >= 1, got {thumb_px}")
    if has_dataset_version(root, dataset_version, storage_options):
        return False
    rows, seen, written_at = [], set(), now_utc()
    for s in sorted(specimens, key=lambda s: s.specimen_id):
        if s.specimen_id in seen:
            raise StoreError(
                f"dataset {dataset_version!r}: duplicate specimen_id {s.specimen_id!r}"
            )
        seen.add(s.specimen_id)
        jpeg, tw, th = _thumbnail(s, thumb_px)
        rows.append(
            {
                "dataset_version": dataset_version,
                "specimen_id": s.specimen_id,
                "task": s.task,
                "prompt": s.prompt,
                "width": s.width,
                "height": s.height,
                "image_path": s.image_path,
                "image_bytes": jpeg,
                "thumb_width": tw,
                "thumb_height": th,
                "ref_boxes": list(s.ref_boxes),
                "ref_answers": list(s.ref_answers),
                "written_at": written_at,
                "dataset_warnings": None if rows else list(warnings),
                "metadata": dict(s.metadata) or None,
            }
        )
    data = rows_to_table(rows, SPECIMENS_SCHEMA, f"specimens of dataset {dataset_version!r}")
    # Overwrite (not append) by version: two ranks writing the same split stay idempotent.
    predicate = f"dataset_version = {sql_str(dataset_version)}"
    _overwrite(root, SPECIMENS, data, predicate, storage_options, _SPECIMEN_WRITER)
    return True


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def training_log_last_step(root: str, run_id: str, storage_options: Options = None) -> int:
    """The highest step in ``run_id``'s stored training log (-1 when it has none)."""
    from deltalake import QueryBuilder

    dt = open_table(str(root), TRAINING_LOG, storage_options)
    sql = f"SELECT MAX(step) AS last FROM t WHERE run_id = {sql_str(run_id)}"
    last = pa.table(QueryBuilder().register("t", dt).execute(sql)).column("last")[0].as_py()
    return -1 if last is None else int(last)


def write_training_log(
    root: str, run_id: str, log_history: Sequence[Mapping], storage_options: Options = None
) -> None:
    """Replace ``run_id``'s rows with a Trainer ``trainer_state.json`` ``log_history``."""
    rows = []
    for i, entry in enumerate(log_history):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("step"), int):
            raise StoreError(f"training log of run {run_id!r}: entry {i} has no integer step")
        rows.append(
            {
                "run_id": run_id,
                "step": entry["step"],
                **{
                    k: _num(entry.get(k))
                    for k in ("epoch", "loss", "eval_loss", "learning_rate", "grad_norm")
                },
                "values": json.dumps(dict(entry), sort_keys=True, default=str),
            }
        )
    data = rows_to_table(rows, TRAINING_LOG_SCHEMA, f"training log of run {run_id!r}")
    _overwrite(str(root), TRAINING_LOG, data, f"run_id = {sql_str(run_id)}", storage_options)


_LIGHT = [
    "eval_id",
    "run_id",
    "step",
    "checkpoint_path",
    "checkpoint_hash",
    "status",
    "error",
    "started_at",
    "finished_at",
    "n_specimens",
    "config_hash",
    "parser_version",
    "scorer_version",
    "dataset_version",
    "predictions_version",
]


def stored_evaluations(root: str, storage_options: Options = None) -> list[dict]:
    """Every evaluation ever made (light columns, oldest first) for the runner's resume."""
    from deltalake import QueryBuilder

    from vieval_runner.store.schema import conform

    dt = open_table(str(root), EVALUATIONS, storage_options)
    table = conform(
        pa.table(QueryBuilder().register("e", dt).execute("SELECT * FROM e")), EVALUATIONS_SCHEMA
    )
    rows = table.select(_LIGHT).to_pylist()
    rows.sort(key=lambda r: (r["finished_at"] is not None, r["finished_at"] or 0))
    return rows
