"""`vieval rescore STORE`: re-parse and re-score stored raw text with the current parser and
scorer, committing each step anew (parser and scorer versions recorded), several steps per
commit. No model is loaded. A text that the same specimen also wrote at the step before is
read once (parsing is a pure function of the text and its settings)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

from rich.console import Console

from vieval_runner import parsing, scoring, store
from vieval_runner.config import Config
from vieval_runner.families import default_coords
from vieval_runner.gc_paused import paused_gc
from vieval_runner.pipeline.progress import progress_bar
from vieval_runner.pipeline.results import (
    frame_columns,
    prediction_of,
    prediction_rows,
    read_output,
    score_predictions,
)
from vieval_runner.records import Box, ParseResult, Prediction, Specimen

# Rescored steps are committed together, up to this many steps or stored rows at a time: a
# commit costs about the same for one step as for ten, and the store gains two versions per
# commit, not per step. An interrupted rescore loses at most one such batch.
COMMIT_STEPS = 16
COMMIT_ROWS = 50_000
# The stored columns a prediction is parsed again from (`_reparse`).
_PARSE_INPUTS = (
    "specimen_id",
    "raw_text",
    "input_width",
    "input_height",
    "confidence",
    "token_logprobs",
    "token_ends",
    "truncated",
)


def _specimens_by_id(reader) -> dict[str, Specimen]:
    table = reader.specimens(with_images=False).to_pylist()
    return {
        row["specimen_id"]: Specimen(
            specimen_id=row["specimen_id"],
            task=row["task"],
            prompt=row["prompt"],
            width=row["width"],
            height=row["height"],
            image_path=row.get("image_path"),
            ref_boxes=[Box.from_row(b) for b in row.get("ref_boxes") or []],
            ref_answers=list(row.get("ref_answers") or []),
        )
        for row in table
    }


def rescore_store(
    root: str,
    run_id: str | None = None,
    console: Console | None = None,
    *,
    storage_options: dict[str, str] | None = None,
) -> list[tuple[str, int]]:
    """Re-parse and re-score every stored step; returns the (run_id, step) pairs committed."""
    console = console or Console()
    reader = store.open_store(root, storage_options=storage_options)
    specimens = _specimens_by_id(reader)
    # Each specimen's last reading by the parser, keyed by everything the parser reads: late
    # checkpoints often write what the one before wrote (76 % of the demo's outputs repeat the
    # previous step's), and parsing is the largest part of a rescore.
    readings: dict[str, tuple[tuple, ParseResult]] = {}
    done: list[tuple[str, int]] = []
    batches = list(_batches(reader, run_id))
    with progress_bar(console) as progress:
        steps = progress.add_task("rescoring steps", total=sum(map(len, batches)))
        for batch in batches:
            # One collection pause for the whole batch, commit included: its rows are freed
            # by reference counting after the commit, so no collection walks them.
            with paused_gc():
                pending = []
                for step in batch:
                    pending.append(_rescored(root, reader, specimens, readings, *step))
                    progress.advance(steps)
                done += _commit(root, pending, storage_options, progress.console)
    return done


def _batches(reader, run_id: str | None) -> Iterator[list[tuple[str, int, dict]]]:
    """The stored steps as (run, step, committing evaluation), in batches of at most
    ``COMMIT_STEPS`` steps or ``COMMIT_ROWS`` rows (a step's rows are never split)."""
    batch: list[tuple[str, int, dict]] = []
    rows = 0
    for run in [run_id] if run_id else reader.runs():
        committed = reader.committed(run)  # step -> the evaluation that committed it
        for step in reader.steps(run):
            batch.append((run, step, committed[step]))
            rows += committed[step].get("n_specimens") or 0
            if rows >= COMMIT_ROWS or len(batch) >= COMMIT_STEPS:
                yield batch
                batch, rows = [], 0
    if batch:
        yield batch


def _rescored(
    root, reader, specimens, readings, run: str, step: int, previous: dict
) -> tuple[dict, list]:
    """One stored step parsed and scored again: its new evaluation row and prediction rows."""
    config = _stored_config(root, run, step, previous)
    table = reader.step(run, step)
    # only the columns parsing reads, column by column (a step's full rows are 5x the work)
    columns = {name: table.column(name).to_pylist() for name in _PARSE_INPUTS}
    fmt = previous["output_format"]
    coords = default_coords(previous.get("model_family"), config.coords)  # the step's frame
    step_specimens, predictions = [], []
    for i, specimen_id in enumerate(columns["specimen_id"]):
        specimen = specimens.get(specimen_id)
        if specimen is None:
            raise store.StoreError(
                f"{root}: prediction for specimen {specimen_id!r} (run {run}, step {step}) "
                "has no row in the specimens table"
            )
        step_specimens.append(specimen)
        row = {name: values[i] for name, values in columns.items()}
        predictions.append(_reparse(row, specimen, fmt, coords, readings))
    aggregates = score_predictions(config, step_specimens, predictions, device="cpu")
    now = datetime.now(UTC)
    recomputed = (*store.AGGREGATE_METRICS, *store.FRAME_CHECK_COLUMNS)
    eval_row = {k: v for k, v in previous.items() if k not in recomputed}
    eval_row.update({k: v for k, v in aggregates.items() if k in store.AGGREGATE_METRICS})
    eval_row.update(frame_columns(step_specimens, predictions, fmt, coords))
    eval_row["ci95"] = aggregates.get("ci95")
    eval_row.update(
        {
            "eval_id": uuid.uuid4().hex,
            "started_at": now,
            "finished_at": now,
            "parser_version": parsing.PARSER_VERSION,
            "scorer_version": scoring.SCORER_VERSION,
            "timings": json.dumps({"rescore_of": previous["eval_id"]}),
        }
    )
    return eval_row, prediction_rows(run, step, eval_row["eval_id"], predictions)


def _stored_config(root: str, run: str, step: int, previous: dict) -> Config:
    """The config a step was evaluated with (rescore scores it the same way again)."""
    where = f"{root}: run {run} step {step} (evaluation {previous.get('eval_id')})"
    if not previous.get("config"):
        raise store.StoreError(f"{where} has no stored config: rescore needs the config the "
                               "step was evaluated with")  # fmt: skip
    try:
        return Config.model_validate(json.loads(previous["config"]))
    except ValueError as exc:  # bad JSON, or a config this version no longer reads
        first = str(exc).strip().splitlines()
        raise store.StoreError(f"{where}: its stored config cannot be read: "
                               f"{' / '.join(first[:3])}") from None  # fmt: skip


def _commit(root: str, pending: list, storage_options, console: Console) -> list[tuple[str, int]]:
    """Commit the rescored steps gathered so far (two table commits for all) and empty the list."""
    store.commit_steps(root, pending, storage_options=storage_options)
    steps = [(ev["run_id"], ev["step"]) for ev, _ in pending]
    for (run, step), (_, rows) in zip(steps, pending, strict=True):
        console.print(f"rescored run {run} step {step} ({len(rows)} specimens)")
    pending.clear()
    return steps


def _reparse(
    row: dict,
    specimen: Specimen,
    fmt: str | None,
    coords: str | None,
    readings: dict[str, tuple[tuple, ParseResult]],
) -> Prediction:
    """A stored row parsed again (the parser's last reading of the same inputs is reused)."""
    text = row["raw_text"] or ""
    input_size = (
        (row["input_width"], row["input_height"])
        if row.get("input_width") and row.get("input_height")
        else None
    )
    truncated = row.get("truncated")  # null in rows stored before it was kept: unknown
    key = (text, input_size, fmt, coords, truncated)
    last = readings.get(specimen.specimen_id)
    if last is not None and last[0] == key:
        result = last[1]
    else:
        result = read_output(specimen, text, input_size, fmt, coords, truncated)
        readings[specimen.specimen_id] = (key, result)
    # the generation's scores: re-parsed boxes get their tokens' scores again
    return prediction_of(
        specimen,
        text,
        result,
        input_size,
        confidence=row.get("confidence"),
        token_logprobs=row.get("token_logprobs"),
        token_ends=row.get("token_ends"),
        truncated=truncated,
    )
