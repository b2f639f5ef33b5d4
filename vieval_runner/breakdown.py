"""Metrics per slice of the validation split: by box size, by label, or by any metadata field.

``size``: COCO's area ranges (small < 32^2 <= medium < 96^2 <= large, box w*h in original
pixels). AP per range is COCOeval's: over all specimens, references outside the range (and
unmatched detections outside it) ignored. F1/P/R/acc@0.5 use the specimens whose reference
boxes' mean area falls in the range. ``label``: the specimen's reference labels (grounding);
VQA uses the ``question_type`` field or the question's first word. Any other name is a specimen metadata field. Every slice carries its n and 95%
intervals, so that a slice of 7 specimens does not look like news.
"""

from __future__ import annotations

import json
import math

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from vieval_runner import evidence, report
from vieval_runner.records import Box
from vieval_runner.scoring import intervals
from vieval_runner.scoring.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_sums
from vieval_runner.scoring.weighted_ap import AREA_RANGES, area_range_ap
from vieval_runner.store import StoreError

SIZES = ("small", "medium", "large")


def size_of(ref_boxes) -> str:
    """A specimen's size slice: COCO range of its reference boxes' mean area ("none": no box)."""
    if not ref_boxes:
        return "none"
    area = float(np.mean([(b.x2 - b.x1) * (b.y2 - b.y1) for b in ref_boxes]))
    return next(s for s in SIZES if area < AREA_RANGES[s][1] or s == "large")


def _slice_values(by: str, task: str, specimens: dict) -> dict[str, str]:
    """specimen_id -> slice name."""
    out = {}
    for sid, spec in specimens.items():
        meta = spec["metadata"]
        if by == "size":
            value = size_of(spec["ref_boxes"])
        elif by == "label":
            labels = sorted({b.label for b in spec["ref_boxes"] if b.label})
            if task == "vqa":
                labels = [str(meta.get("question_type") or (spec["prompt"] or "").split(" ")[0])]
            value = "|".join(labels) or spec["prompt"] or "(none)"
        else:
            value = meta.get(by)
            value = "(missing)" if value is None else str(value)
        out[sid] = value
    return out


def _specimens(reader) -> dict:
    table = reader.specimens()
    cols = {c: table.column(c).to_pylist() for c in ("specimen_id", "prompt", "ref_boxes")}
    metas = table.column("metadata").to_pylist() if "metadata" in table.column_names else None
    have = "ref_answers" in table.column_names
    answers = table.column("ref_answers").to_pylist() if have else [None] * table.num_rows
    out = {}
    for i, sid in enumerate(cols["specimen_id"]):
        meta = json.loads(metas[i]) if metas and metas[i] else {}
        refs = [Box.from_row(b) for b in cols["ref_boxes"][i] or []]
        out[sid] = {"prompt": cols["prompt"][i], "ref_boxes": refs, "metadata": meta,
                    "ref_answers": list(answers[i] or [])}  # fmt: skip
    return out


def breakdown(
    reader,
    by: str,
    run_id: str | None = None,
    steps: list[int] | None = None,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    ap_resamples: int = intervals.AP_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[dict]:
    """Rows ``{run_id, by, slice, step, n, <metric>, <metric>_ci95 ...}`` for every step of
    every run (or the given ones). StoreError when ``by`` names no field any specimen has."""
    specimens = _specimens(reader)
    if by not in ("size", "label") and not any(by in s["metadata"] for s in specimens.values()):
        fields = sorted({k for s in specimens.values() for k in s["metadata"]})
        raise StoreError(
            f"{reader.root}: no specimen has a field {by!r} (use size, label"
            f"{', ' + ', '.join(fields) if fields else ''})"
        )
    kw = {"n_resamples": n_resamples, "ap_resamples": ap_resamples, "seed": seed}
    rows = []
    for run in [run_id] if run_id else reader.runs():
        task = report.run_task(reader, run)
        slices = _slice_values(by, task, specimens)
        for step in steps if steps is not None else reader.steps(run):
            rows += _step_rows(reader, run, step, task, by, slices, specimens, kw)
    return rows


def _step_rows(reader, run, step, task, by, slices, specimens, kw) -> list[dict]:
    answers = {s: v["ref_answers"] for s, v in specimens.items()} if task == "vqa" else None
    data = evidence.step_rows(reader, run, step, boxes=task == "grounding", answers=answers)
    ids = data["specimen_id"]
    names = [slices.get(s, "(unknown)") for s in ids]
    finish = intervals.finisher(task)
    cols = intervals.columns_of(task, data)  # once: BLEU's statistics tokenize every answer
    order = SIZES if by == "size" else sorted(set(names))
    out = []
    for name in order:
        keep = np.array([n == name for n in names], dtype=bool)
        n = int(keep.sum())
        row = {"run_id": run, "by": by, "slice": name, "step": step, "n": n}
        if n:
            point = finish(cols[keep].sum(0)[None])
            cis = bootstrap_sums(cols[keep], finish, n_resamples=kw["n_resamples"],
                                 seed=kw["seed"])  # fmt: skip
            if task == "vqa" and not intervals.has_bleu(cols):
                del point["bleu"], cis["bleu"]
            row |= {k: _num(v[0]) for k, v in point.items()}
            row |= {f"{k}_ci95": v for k, v in cis.items()}
        if by == "size" and task == "grounding":
            row |= _size_ap(data, ids, specimens, name, kw)
        out.append(row)
    return out


def _size_ap(data, ids, specimens, area, kw) -> dict:
    """COCOeval's AP for one area range, over every specimen of the step."""
    if not all(s in specimens for s in ids):
        return {}
    preds, refs = data["pred_boxes"], [specimens[s]["ref_boxes"] for s in ids]
    got = area_range_ap(preds, refs, area)
    if got is None:
        return {"ap50": None, "ap": None}
    ci = intervals.ap_intervals(preds, refs, area=area, seed=kw["seed"],
                                n_resamples=kw["ap_resamples"])  # fmt: skip
    return {"ap50": got["ap50"], "ap": got["ap"], "ap50_ci95": ci["ap50"], "ap_ci95": ci["ap"]}


def _num(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def print_breakdown(rows: list[dict], by: str, console: Console) -> None:
    """One table per run and step: slice, n, metrics with their intervals."""
    if not rows:
        console.print("The store holds no evaluations yet.")
        return
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["run_id"], row["step"]), []).append(row)
    for (run, step), group in groups.items():
        metrics = tuple(m for m in BREAKDOWN_METRICS if any(m in r for r in group))
        table, _ = report.fit_table(
            console, lambda ms, group=group, title=f"run {run} step {step} by {by}":
            _slice_table(title, by, group, ms), metrics,
        )  # fmt: skip
        console.print(table)
    console.print("[dim]value (95% CI); slices under 30 specimens are dimmed[/]")


# most telling first: narrow terminals drop from the end (report.DROP_ORDER)
BREAKDOWN_METRICS = ("f1", "acc_at_50", "ap50", "precision", "recall", "ap",
                     *intervals.VQA_INTERVAL_METRICS)  # fmt: skip


def _slice_table(title: str, by: str, group: list[dict], metrics: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column(by)
    table.add_column("n", justify="right", no_wrap=True)
    for m in metrics:
        table.add_column(report.SHORT.get(m, m), justify="right", no_wrap=True)
    for r in group:
        cells = [str(r["slice"]), str(r["n"])]
        cells += [_cell(r.get(m), r.get(f"{m}_ci95")) for m in metrics]
        table.add_row(*cells, style="dim" if r["n"] < 30 else None)
    return table


def _cell(value, ci) -> str:
    if value is None:
        return "-"
    if not ci or ci[0] is None:
        return f"{value:.2f}"
    return f"{value:.2f} ({ci[0]:.2f}-{ci[1]:.2f})"
