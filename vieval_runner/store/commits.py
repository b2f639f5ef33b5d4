"""The commit protocol's reading rule, in one place for every reader.

A (run, step) is committed when an ``ok`` evaluation row of it is stored; its latest one
(evaluations oldest first) is the step's **marker**, and the step's predictions are exactly
the rows with the marker's ``eval_id`` (in the predictions version the marker records, if a
later unfinished commit replaced them since). Prediction rows of a (run, step) with any other
``eval_id`` are **orphans**: left by a writer that died, or ran out of disk, between its two
commits. See docs/store.md, "The commit protocol".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


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
