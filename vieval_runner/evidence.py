"""Evidence from a store: per-step intervals, paired comparisons of steps (or runs), and
whether the best step is significantly better, all from stored per-specimen rows.

No model is needed: the rows hold each specimen's tp/fp/fn, acc@0.5 and answer metrics, the
predicted boxes and their scores, the predicted answer; reference boxes and answers come from
the specimens table (the step's dataset version).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vieval_runner.records import Box
from vieval_runner.scoring import intervals
from vieval_runner.scoring.intervals import AP_RESAMPLES
from vieval_runner.scoring.stats import DEFAULT_RESAMPLES, DEFAULT_SEED
from vieval_runner.store import StoreError

ROW_COLUMNS = (
    "specimen_id",
    *("tp", "fp", "fn", "precision", "recall", "f1", "iou_mean", "acc_at_50"),
    *("exact_match", "vqa_accuracy", "token_f1", "bleu", "rouge_l", "anls", "pred_answer"),
)
COMPARE_METRICS = {
    "grounding": ("f1", "precision", "recall", "acc_at_50"),
    "vqa": intervals.VQA_INTERVAL_METRICS,
}


def step_rows(
    reader,
    run_id: str,
    step: int,
    boxes: bool = False,
    answers: Mapping[str, list[str]] | None = None,
) -> dict[str, list]:
    """One step's stored per-specimen columns (sorted by specimen id), as lists; with
    ``answers`` (specimen_id -> reference answers) a ``ref_answers`` column too (None where
    a specimen has none), which gives BLEU its interval."""
    table = reader.step(run_id, step)
    cols = [c for c in ROW_COLUMNS if c in table.column_names]
    rows = {c: table.column(c).to_pylist() for c in cols}
    if boxes:
        rows["pred_boxes"] = [
            [Box.from_row(b) for b in bs or []] for bs in table.column("pred_boxes").to_pylist()
        ]
    if answers is not None:
        rows["ref_answers"] = [answers.get(i) for i in rows["specimen_id"]]
    return rows


def references(reader, dataset_version: str | None = None) -> dict[str, list[Box]]:
    """specimen_id -> reference boxes (the newest stored copy of each specimen)."""
    table = reader.specimens(dataset_version=dataset_version)
    ids = table.column("specimen_id").to_pylist()
    refs = table.column("ref_boxes").to_pylist()
    return {i: [Box.from_row(b) for b in r or []] for i, r in zip(ids, refs, strict=True)}


def reference_answers(reader, dataset_version: str | None = None) -> dict[str, list[str]]:
    """specimen_id -> reference answers (the newest stored copy of each specimen)."""
    table = reader.specimens(dataset_version=dataset_version)
    ids = table.column("specimen_id").to_pylist()
    if "ref_answers" not in table.column_names:
        return {}
    refs = table.column("ref_answers").to_pylist()
    return {i: list(r or []) for i, r in zip(ids, refs, strict=True)}


def step_references(reader, run_id: str, step: int, task: str) -> dict:
    """The references of a step's specimens in its dataset version: boxes (grounding) or
    answers (VQA)."""
    version = reader.committed(run_id).get(step, {}).get("dataset_version")
    load = references if task == "grounding" else reference_answers
    return load(reader, version)


def step_intervals(
    reader,
    run_id: str,
    step: int,
    task: str,
    refs: Mapping[str, list] | None = None,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    ap_resamples: int = AP_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, list[float | None]]:
    """``{"<metric>_ci95": [low, high]}`` of one stored step. ``refs`` (specimen_id ->
    reference boxes for grounding, answers for VQA) adds AP50/AP or BLEU."""
    grounding = task == "grounding"
    answers = refs if refs is not None and not grounding else None
    rows = step_rows(reader, run_id, step, boxes=grounding and refs is not None, answers=answers)
    preds = ref_boxes = None
    if "pred_boxes" in rows and refs is not None:
        ids = rows["specimen_id"]
        if all(i in refs for i in ids):
            preds, ref_boxes = rows["pred_boxes"], [refs[i] for i in ids]
    got = intervals.step_intervals(task, rows, preds, ref_boxes, n_resamples=n_resamples,
                                   ap_resamples=ap_resamples, seed=seed)  # fmt: skip
    return {f"{k}_ci95": v for k, v in got.items()}


def _aligned(rows_a: dict, rows_b: dict) -> tuple[dict, dict]:
    """Both steps' rows restricted to the specimens they share, in the same order."""
    pos_b = {s: i for i, s in enumerate(rows_b["specimen_id"])}
    keep_a = [i for i, s in enumerate(rows_a["specimen_id"]) if s in pos_b]
    keep_b = [pos_b[rows_a["specimen_id"][i]] for i in keep_a]
    pick = lambda rows, idx: {k: [v[i] for i in idx] for k, v in rows.items()}  # noqa: E731
    return pick(rows_a, keep_a), pick(rows_b, keep_b)


def compare(
    reader,
    task: str,
    run_a: str,
    step_a: int,
    run_b: str,
    step_b: int,
    metric: str | None = None,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict:
    """B minus A on the shared specimens (see `scoring.intervals.compare_steps`).

    StoreError when a step has no predictions or the metric cannot be compared.
    """
    metric = metric or ("f1" if task == "grounding" else "exact_match")
    if metric not in COMPARE_METRICS[task]:
        allowed = ", ".join(COMPARE_METRICS[task])
        raise StoreError(f"cannot compare {metric!r} of {task} steps (allowed: {allowed})")
    for run, step in ((run_a, step_a), (run_b, step_b)):
        if step not in reader.steps(run):
            have = ", ".join(map(str, reader.steps(run))) or "none"
            raise StoreError(f"{reader.root}: run {run!r} has no step {step} (steps: {have})")
    answers_a = answers_b = None
    if metric == "bleu":  # its statistics come from the answers' text: only BLEU reads them
        answers_a = step_references(reader, run_a, step_a, task)
        answers_b = step_references(reader, run_b, step_b, task)
    rows_a, rows_b = _aligned(
        step_rows(reader, run_a, step_a, answers=answers_a),
        step_rows(reader, run_b, step_b, answers=answers_b),
    )
    if not rows_a["specimen_id"]:
        raise StoreError(
            f"run {run_a!r} step {step_a} and run {run_b!r} step {step_b} share no specimen"
        )
    try:
        got = intervals.compare_steps(task, metric, rows_a, rows_b, n_resamples=n_resamples,
                                      seed=seed)  # fmt: skip
    except ValueError as err:  # BLEU of a specimen whose references are not stored
        raise StoreError(f"{reader.root}: {err}") from err
    return {
        "metric": metric,
        "run_a": run_a,
        "step_a": step_a,
        "run_b": run_b,
        "step_b": step_b,
        **{k: got[k] for k in ("n", "difference", "ci95", "p_value", "test")},
        **{k: got[k] for k in ("better", "worse", "unchanged")},
    }


def best_step_evidence(
    reader, run_id: str, task: str, metric: str, steps: list[dict], best: int | None, **kw
) -> dict | None:
    """The best step against the next best and against the first step (step 0 if evaluated):
    ``{"vs_next": comparison, "vs_first": comparison}`` with a ``significant`` flag each."""
    if best is None or metric not in COMPARE_METRICS.get(task, ()):
        return None
    values = [(r["step"], r.get(metric)) for r in steps if r.get(metric) is not None]
    others = sorted(((v, s) for s, v in values if s != best), key=lambda vs: (-vs[0], vs[1]))
    out: dict = {}
    first = values[0][0] if values else None
    for name, other in (("vs_next", others[0][1] if others else None), ("vs_first", first)):
        if other is None or other == best:
            out[name] = None
            continue
        got = compare(reader, task, run_id, other, run_id, best, metric, **kw)
        got["significant"] = intervals.significant(got)
        out[name] = got
    return out


def significance_line(evidence: Mapping | None) -> str | None:
    """A sentence on whether the best step's lead is more than noise."""
    if not evidence:
        return None
    parts = []
    seen = set()
    for name, what in (("vs_next", "the next best"), ("vs_first", "the first step")):
        got = evidence.get(name)
        if not got:
            continue
        if got["step_a"] in seen:  # the next best is the first step: one sentence
            parts[-1] = parts[-1].replace("the next best", "the next best and first step")
            continue
        seen.add(got["step_a"])
        verdict = (
            "significantly better than" if got["significant"] else "not significantly better than"
        )
        p = got["p_value"]
        parts.append(
            f"{verdict} {what} (step {got['step_a']}: {got['difference']:+.3f}, "
            f"95% CI [{got['ci95'][0]:+.3f}, {got['ci95'][1]:+.3f}], p={p:.3g}, n={got['n']})"
        )
    return "; ".join(parts) if parts else None


def nan_free(value):
    """Replace NaN floats with None in nested lists/dicts (JSON output)."""
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, list):
        return [nan_free(v) for v in value]
    if isinstance(value, dict):
        return {k: nan_free(v) for k, v in value.items()}
    return value
