"""The commit protocol's reading rule, in one place for every reader.

A (run, step) is committed when an ``ok`` evaluation row of it is stored; its latest one
(evaluations oldest first) is the step's **marker**, and the step's predictions are exactly
the rows with the marker's ``eval_id`` (in the predictions version the marker records, if a
later unfinished commit replaced them since). Prediction rows of a (run, step) with any other
``eval_id`` are **orphans**: left by a writer that died, or ran out of disk, between its two
commits. See docs/store.md, "The commit protocol".
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping

import pyarrow as pa
from deltalake import QueryBuilder

from vieval_runner.store.schema import PREDICTIONS, PREDICTIONS_SCHEMA, StoreError, conform
from vieval_runner.store.tables import open_table


def markers(evaluations: Iterable[Mapping]) -> dict[tuple[str, int], dict]:
    """``(run_id, step) -> marker row`` from evaluation rows ordered oldest first."""
    found: dict[tuple[str, int], dict] = {}
    for row in evaluations:
        if row.get("status") == "ok" and row.get("eval_id") and row.get("step") is not None:
            found[(row["run_id"], int(row["step"]))] = dict(row)  # later rows win
    return found


def has_rows(marker: Mapping) -> bool:
    """Whether the marker's step should have prediction rows (an empty split has none)."""
    n = marker.get("n_specimens")
    return n is None or n > 0


def predictions_at(
    root: str, options: dict[str, str] | None, version: int, sql: str, what: str
) -> pa.Table:
    """``sql`` on the predictions table at ``version``: a committed step's rows after an
    unfinished later commit replaced them. StoreError once vacuum has removed that version."""
    try:
        dt = open_table(root, PREDICTIONS, options, version=version)
        return conform(pa.table(QueryBuilder().register(PREDICTIONS, dt).execute(sql)),
                       PREDICTIONS_SCHEMA)  # fmt: skip
    except Exception as exc:
        raise StoreError(
            f"{root}: {what}: its committed predictions (version {version}) were replaced by "
            f"an unfinished commit and cannot be read any more ({exc}); evaluate the step "
            "again (`vieval check` lists such steps)"
        ) from None


PAUSE_ENV = "VIEVAL_TEST_PAUSE_AT"
COMMIT_POINTS = ("before-predictions", "between", "after-evaluation")


def pause_point(point: str) -> None:
    """Test hook for the kill tests (docs/store.md, "The commit protocol").

    With ``VIEVAL_TEST_PAUSE_AT=<point>`` (one of ``COMMIT_POINTS``) in the environment, the
    writer prints ``vieval-paused <point>`` to stderr on reaching that point of
    ``commit_step`` and sleeps until killed, so a test can SIGKILL it there exactly. Unset,
    as in production, it is one environment lookup per commit and does nothing.
    """
    if os.environ.get(PAUSE_ENV) != point:
        return
    sys.stderr.write(f"vieval-paused {point}\n")
    sys.stderr.flush()
    while True:
        time.sleep(3600)
