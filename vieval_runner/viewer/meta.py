"""The meta document's parts: one run's steps, aggregates, training log, failures and best
step, read from its store; and the document's frame (also the "waiting" page's document).
"""

from __future__ import annotations

import contextlib
from typing import Any

from vieval_runner.viewer.analysis import (
    AGGREGATE_KEYS,
    GROUNDING_METRICS,
    PRIMARY,
    VQA_METRICS,
    best_and_overfit,
    clean,
    failure_actions,
)
from vieval_runner.viewer.evidence import best_significance, recompute_missing, stored_intervals
from vieval_runner.viewer.stores import StoreHandle, StoreUnavailable

LOG_KEYS = ("step", "loss", "eval_loss", "learning_rate", "epoch")


def run_meta(
    st: StoreHandle, run_id: str, key: str, label: str, specimen_tasks: set[str], retries: int
) -> dict:
    """Everything the page shows about run ``run_id`` of store ``st`` except its predictions.

    ``specimen_tasks`` (the tasks of all known specimens) decides the task of a run whose
    evaluations do not say it. StoreUnavailable when its steps or evaluations cannot be read.
    """
    # committed steps and the evaluation that committed each: the store's one reading rule
    committed = st.read(lambda r: r.committed(run_id), retries)
    steps = [int(s) for s in st.read(lambda r: r.steps(run_id), retries)]
    eval_ids: dict[str, Any] = {str(s): m.get("eval_id") for s, m in committed.items()}
    evals = st.read(lambda r: r.evaluations(run_id).to_pylist(), retries)
    failed: dict[int, dict] = {}  # step -> its latest failure, unless a later one succeeded
    tasks = []
    for e in evals:  # oldest first: later evaluations of a step win
        if e.get("step") is None:
            continue
        step = int(e["step"])
        if e.get("status") == "failed":
            failed[step] = {"step": step, "error": e.get("error") or ""}
        else:
            failed.pop(step, None)
            if e.get("task"):
                tasks.append(e["task"])
    try:
        aggs = clean(st.read(lambda r: r.aggregates(run_id).to_pylist(), retries))
    except StoreUnavailable:
        aggs = []
    try:
        log = clean(st.read(lambda r: r.training_log(run_id).to_pylist(), retries))
    except StoreUnavailable:
        log = []
    log = [{k: row.get(k) for k in LOG_KEYS} for row in log if row.get("step") is not None]
    # the coordinate-frame check's verdict rides along: the page shows its advice line
    frame_check = ("coords_best_fit", "coords_best_fit_f1", "coords_advice")
    keep = ("step", "eval_id", "n_specimens", "ci95", *AGGREGATE_KEYS, *frame_check)
    aggs = sorted(
        ({k: a.get(k) for k in keep if k in a} for a in aggs), key=lambda a: a.get("step", 0)
    )
    task = tasks[-1] if tasks and tasks[-1] in PRIMARY else run_task(specimen_tasks, aggs)
    stored_intervals(aggs)
    read_step = lambda s: st.read(lambda r: r.step(run_id, s), retries)  # noqa: E731
    with contextlib.suppress(StoreUnavailable):  # the page still works without intervals
        recompute_missing(read_step, (st.root, run_id), task, aggs, PRIMARY[task])
    best, overfit = best_and_overfit(aggs, PRIMARY[task])
    if best is not None:
        with contextlib.suppress(StoreUnavailable):
            best |= best_significance(read_step, task, PRIMARY[task], aggs, best)
    return {
        "key": key,
        "run_id": run_id,
        "store": st.index,
        "label": label,
        "task": task,
        "steps": sorted(steps),
        "eval_ids": eval_ids,
        "aggregates": aggs,
        "training_log": sorted(log, key=lambda r: r["step"]),
        "failed": clean(sorted(failed.values(), key=lambda f: f["step"])),
        "best": best,
        "overfitting": overfit,
    }


def run_task(specimen_tasks: set[str], aggs: list[dict]) -> str:
    """A run's task when no evaluation names it: the specimens', else what its metrics show."""
    if specimen_tasks == {"vqa"}:
        return "vqa"
    if specimen_tasks == {"grounding"} or not aggs:
        return "grounding"
    has_g = any(a.get("f1") is not None for a in aggs)
    return "grounding" if has_g else "vqa"


def waiting_meta(
    message: str, stores: list[StoreHandle], n_specimens: int, poll_seconds: float
) -> dict:
    """The meta document with no runs: the waiting page's, and the frame of every other."""
    return {
        "waiting": True,
        "message": message,
        "stores": [st.describe() for st in stores],
        "runs": [],
        "task": None,
        "n_specimens": n_specimens,
        "failure_actions": failure_actions(),
        "poll_seconds": poll_seconds,
        "metrics": {"grounding": list(GROUNDING_METRICS), "vqa": list(VQA_METRICS)},
        "primary": PRIMARY,
        "rev": None,
    }
