"""Intervals, significance and breakdowns for the page, computed from stored rows.

Uses ``vieval_runner.scoring``'s statistics (imported lazily, as the rest of the viewer does)
so the page and ``vieval summary`` / ``vieval compare`` agree; without it, the page simply
shows no bands, markers or breakdowns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np

from vieval_runner.viewer.analysis import clean, scoring_module

BREAKDOWN_RESAMPLES = 1000
SIZE_LIMITS = (("small", 32.0**2), ("medium", 96.0**2), ("large", math.inf))  # COCO areaRng


def stored_intervals(aggs: list[dict]) -> None:
    """Spread each aggregate row's stored ``ci95`` JSON into ``<metric>_ci95`` keys."""
    for a in aggs:
        raw = a.pop("ci95", None)
        try:
            cis = json.loads(raw) if isinstance(raw, str) else {}
        except ValueError:
            cis = {}
        for metric, ci in (cis or {}).items():
            if isinstance(ci, list) and len(ci) == 2:
                a[f"{metric}_ci95"] = clean(ci)


_COMPUTED: dict[tuple, dict] = {}  # (store root, run, step, eval id) -> intervals


def recompute_missing(read_step, key: tuple, task: str, aggs: list[dict], metric: str) -> None:
    """Steps whose evaluation stored no intervals (older stores) get them from their rows."""
    scoring = scoring_module()
    if scoring is None:
        return
    for a in aggs:
        if f"{metric}_ci95" in a or a.get(metric) is None:  # stored, or nothing to bound
            continue
        ckey = (*key, a["step"], a.get("eval_id"))
        if ckey not in _COMPUTED:
            table = read_step(a["step"])
            rows = _columns(table, ROW_NAMES)
            _COMPUTED[ckey] = {
                f"{k}_ci95": v for k, v in scoring.step_intervals(task, rows).items()
            }
        a.update(clean(_COMPUTED[ckey]))


def _columns(table, names: tuple[str, ...]) -> dict[str, list]:
    have = table.column_names
    return {n: table.column(n).to_pylist() if n in have else [None] * table.num_rows for n in names}


ROW_NAMES = ("specimen_id", "tp", "fp", "fn", "acc_at_50", "f1", "precision", "recall",
             "exact_match", "vqa_accuracy", "token_f1", "rouge_l", "anls")  # fmt: skip


def compare(read_step: Callable[[int], object], task: str, metric: str, a: int, b: int) -> dict:
    """Step ``b`` minus step ``a`` of one run on the shared specimens (scoring.compare_steps)."""
    scoring = scoring_module()
    if scoring is None:
        return {}
    rows_a, rows_b = _columns(read_step(a), ROW_NAMES), _columns(read_step(b), ROW_NAMES)
    pos = {s: i for i, s in enumerate(rows_b["specimen_id"])}
    keep = [i for i, s in enumerate(rows_a["specimen_id"]) if s in pos]
    rows_a = {k: [v[i] for i in keep] for k, v in rows_a.items()}
    rows_b = {k: [v[pos[s]] for s in rows_a["specimen_id"]] for k, v in rows_b.items()}
    if not keep:
        return {}
    got = scoring.compare_steps(task, metric, rows_a, rows_b)
    return clean(got | {"step_a": a, "step_b": b, "significant": got["p_value"] is not None
                        and got["p_value"] < 0.05})  # fmt: skip


def best_significance(read_step, task: str, metric: str, aggs: list[dict], best: dict) -> dict:
    """The best step against the next best by ``metric``: ``{vs_next, significant}``."""
    others = sorted(
        (a for a in aggs if a.get(metric) is not None and a["step"] != best["step"]),
        key=lambda a: (-a[metric], a["step"]),
    )
    if not others:
        return {}
    try:
        got = compare(read_step, task, metric, others[0]["step"], best["step"])
    except ValueError:  # a metric without a paired comparison
        return {}
    return {"vs_next": got, "significant": bool(got.get("significant"))} if got else {}


def size_of(ref_boxes: list[list]) -> str:
    """COCO size slice of a specimen: its reference boxes' mean w*h ("none" without boxes)."""
    if not ref_boxes:
        return "none"
    area = float(np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in ref_boxes]))
    return next(name for name, limit in SIZE_LIMITS if area < limit)


def slice_names(record: dict, by: str) -> str:
    if by == "size":
        return size_of(record.get("ref_boxes") or [])
    if by == "label":
        if record.get("task") == "vqa":
            meta = record.get("meta") or {}
            return str(meta.get("question_type") or (record.get("prompt") or "").split(" ")[0])
        labels = sorted({str(b[4]) for b in record.get("ref_boxes") or [] if b[4]})
        return "|".join(labels) or record.get("prompt") or "(none)"
    value = (record.get("meta") or {}).get(by)
    return "(missing)" if value is None else str(value)


def breakdowns(rows: list[dict], records: list[dict], task: str) -> dict:
    """``{by: [{slice, n, metric, value, ci95, ids}]}`` for size (grounding), label and every
    metadata field of the step's specimens; ``ids`` are specimen indexes (the list filter)."""
    scoring = scoring_module()
    if scoring is None or not rows:
        return {}
    intervals = scoring.intervals
    metric = "f1" if task == "grounding" else "exact_match"
    fields = sorted({k for r in rows for k in (records[r["i"]].get("meta") or {})})
    out = {}
    for by in ("size", "label", *fields) if task == "grounding" else ("label", *fields):
        groups: dict[str, list[int]] = {}
        for k, r in enumerate(rows):
            groups.setdefault(slice_names(records[r["i"]], by), []).append(k)
        table = []
        for name in sorted(groups, key=lambda s: ("small", "medium", "large", "none").index(s)
                           if by == "size" else s):  # fmt: skip
            ks = groups[name]
            cols = {c: [rows[k].get(c) for k in ks] for c in ROW_NAMES[1:]}
            columns = intervals.columns_of(task, cols)
            value = intervals.finisher(task)(columns.sum(0)[None])[metric][0]
            ci = scoring.stats.bootstrap_sums(
                columns, intervals.finisher(task), n_resamples=BREAKDOWN_RESAMPLES
            )[metric]
            table.append({"slice": name, "n": len(ks), "metric": metric, "value": value,
                          "ci95": ci, "ids": [rows[k]["i"] for k in ks]})  # fmt: skip
        out[by] = clean(table)
    return out
