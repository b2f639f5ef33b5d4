"""A step's headline metrics as functions of summed per-specimen columns, their bootstrap
intervals, and paired comparisons of two steps on the specimens they share.

Per-specimen inputs are the stored prediction columns (``tp fp fn acc_at_50 iou_mean`` for
grounding, the answer metrics for VQA), so everything is recomputable from a store without
a model. VQA's corpus BLEU is a function of summed per-answer n-gram statistics (`bleu`),
recomputed from the stored answer and its references when the rows carry ``pred_answer`` and
``ref_answers``; without them BLEU gets no interval. AP intervals re-weight detections
matched once (`weighted_ap`); they use ``ap_resamples`` (default 200) draws because each
draw is a cumulative sum over the step's true positives at 10 IoU thresholds, not one matrix
product (about 0.3 s for 200 draws of a 10,000-specimen step on 2 CPU cores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from vieval_runner.records import Box
from vieval_runner.scoring import bleu
from vieval_runner.scoring.stats import (
    CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    bootstrap_sums,
    change_counts,
    mcnemar_exact,
    paired_difference,
    percentile_interval,
    resample_counts,
)
from vieval_runner.scoring.weighted_ap import AREA_RANGES, detection_table, weighted_ap

AP_RESAMPLES = 200
GROUNDING_INTERVAL_METRICS = ("f1", "precision", "recall", "acc_at_50")
VQA_MEAN_METRICS = ("exact_match", "vqa_accuracy", "token_f1", "rouge_l", "anls")
VQA_INTERVAL_METRICS = (*VQA_MEAN_METRICS, "bleu")
AP_METRICS = ("ap50", "ap")
# Per-specimen outcomes that are 0/1: two steps are compared with the exact McNemar test.
BINARY_METRICS = frozenset({"acc_at_50", "exact_match"})
GROUNDING_COLUMNS = ("tp", "fp", "fn", "acc_sum", "acc_n")


def _num(values: Sequence) -> np.ndarray:
    """Floats with None/NaN as NaN."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def grounding_columns(rows: Mapping[str, Sequence]) -> np.ndarray:
    """``[n, 5]`` per-specimen sums: tp, fp, fn, acc@0.5 (value, present).

    All small integers, so a step has few distinct rows and resampling is a multinomial over
    them (`stats.resample_sums`); mean IoU (continuous) gets no interval for that reason.
    """
    tp, fp, fn = (np.nan_to_num(_num(rows[k])) for k in ("tp", "fp", "fn"))
    acc = _num(rows["acc_at_50"])
    return np.stack([tp, fp, fn, np.nan_to_num(acc), ~np.isnan(acc)], axis=1)


def finish_grounding(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Micro P/R/F1 (scoring's empty-case rules) and acc@0.5 from summed columns."""
    tp, fp, fn, acc, acc_n = (sums[:, k] for k in range(5))
    empty = (tp + fp == 0) & (tp + fn == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(empty, 1.0, np.where(tp + fp > 0, tp / (tp + fp), 0.0))
        recall = np.where(empty, 1.0, np.where(tp + fn > 0, tp / (tp + fn), 0.0))
        f1 = np.where(empty, 1.0, 2 * tp / (2 * tp + fp + fn))
        acc_at_50 = np.where(acc_n > 0, acc / acc_n, np.nan)
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "acc_at_50": acc_at_50,
    }


def vqa_columns(rows: Mapping[str, Sequence]) -> np.ndarray:
    """``[n, 2m + 11]`` per-specimen (value, present) pairs of the VQA mean metrics, then
    BLEU's: present, and the answer's n-gram statistics (`bleu.sentence_statistics`).

    BLEU is present only when every specimen has its answer text and references: corpus
    BLEU of a subset would not be the step's BLEU."""
    n = len(rows["exact_match"])
    cols = []
    for name in VQA_MEAN_METRICS:
        v = _num(rows.get(name) or [None] * n)
        cols += [np.nan_to_num(v), ~np.isnan(v)]
    stats = np.zeros((n, 1 + bleu.N_STATS))
    answers, refs = rows.get("pred_answer"), rows.get("ref_answers")
    known = rows.get("bleu_stats")  # scoring's own pass (`vqa.score_vqa`): not done twice
    if n and known is not None and all(k is not None for k in known):
        stats = np.concatenate([np.ones((n, 1)), np.asarray(known, dtype=np.float64)], 1)
    elif n and answers is not None and refs is not None and all(refs):
        stats = np.concatenate([np.ones((n, 1)), bleu.sentence_statistics(answers, refs)], 1)
    return np.concatenate([np.stack(cols, axis=1), stats], axis=1)


def finish_vqa(sums: np.ndarray) -> dict[str, np.ndarray]:
    k = 2 * len(VQA_MEAN_METRICS)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            name: np.where(sums[:, 2 * j + 1] > 0, sums[:, 2 * j] / sums[:, 2 * j + 1], np.nan)
            for j, name in enumerate(VQA_MEAN_METRICS)
        }
    present = sums[:, k] > 0
    out["bleu"] = np.full(len(sums), np.nan)
    if present.any():
        out["bleu"][present] = bleu.corpus_scores(sums[present, k + 1 :])
    return out


def has_bleu(columns: np.ndarray) -> bool:
    """Whether VQA columns carry BLEU statistics (the rows had answers and references)."""
    return bool(columns.shape[0]) and bool(columns[0, 2 * len(VQA_MEAN_METRICS)])


def columns_of(task: str, rows: Mapping[str, Sequence]) -> np.ndarray:
    return grounding_columns(rows) if task == "grounding" else vqa_columns(rows)


def finisher(task: str):
    return finish_grounding if task == "grounding" else finish_vqa


def step_intervals(
    task: str,
    rows: Mapping[str, Sequence],
    pred_boxes: list[list[Box]] | None = None,
    ref_boxes: list[list[Box]] | None = None,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    ap_resamples: int = AP_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = CONFIDENCE,
    area: str = "all",
    method: str = "auto",
) -> dict[str, list[float | None]]:
    """``{metric: [low, high]}`` specimen-level percentile bootstrap intervals of one step.

    ``rows`` holds the stored per-specimen columns. With boxes (grounding), AP50 and AP get
    intervals too when every predicted box is scored; with ``pred_answer`` and
    ``ref_answers`` (VQA), BLEU does (no ``bleu`` key otherwise).
    """
    columns = columns_of(task, rows)
    out = bootstrap_sums(
        columns,
        finisher(task),
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
        method=method,
    )
    if task == "vqa" and not has_bleu(columns):
        out.pop("bleu", None)
    if task == "grounding" and pred_boxes is not None and ref_boxes is not None:
        out |= ap_intervals(pred_boxes, ref_boxes, n_resamples=ap_resamples, seed=seed,
                            confidence=confidence, area=area)  # fmt: skip
    return out


def ap_intervals(
    pred_boxes: list[list[Box]],
    ref_boxes: list[list[Box]],
    *,
    n_resamples: int = AP_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = CONFIDENCE,
    area: str = "all",
) -> dict[str, list[float | None]]:
    """Bootstrap intervals of AP50 and AP (``[None, None]`` where AP is undefined)."""
    none = {k: [None, None] for k in AP_METRICS}
    if not any(len(p) for p in pred_boxes):
        return none
    table = detection_table(pred_boxes, ref_boxes, AREA_RANGES[area])
    if table is None:
        return none
    draws: dict[str, list[np.ndarray]] = {k: [] for k in AP_METRICS}
    for counts in resample_counts(table.n_images, n_resamples, seed, batch=20):
        got = weighted_ap(table, counts)
        for k in AP_METRICS:
            draws[k].append(got[k])
    return {k: percentile_interval(np.concatenate(v), confidence) for k, v in draws.items()}


def compare_steps(
    task: str,
    metric: str,
    rows_a: Mapping[str, Sequence],
    rows_b: Mapping[str, Sequence],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict:
    """B minus A on the specimens both hold (rows aligned by the caller): difference, paired
    bootstrap interval, p-value, and how many specimens got better / worse / stayed.

    0/1 outcomes (acc@0.5, exact match) use the exact McNemar test on specimens where both
    have the outcome; the rest a paired permutation test of the step statistic (for BLEU,
    corpus BLEU: a swapped specimen moves its n-gram statistics, as in sacrebleu's paired
    approximate randomization). Better / worse counts use the stored per-specimen value
    (sentence BLEU for BLEU).
    """
    finish = finisher(task)
    names = GROUNDING_INTERVAL_METRICS if task == "grounding" else VQA_INTERVAL_METRICS
    if metric not in names:
        raise ValueError(f"no paired comparison for metric {metric!r} of a {task} step")
    cols_a, cols_b = columns_of(task, rows_a), columns_of(task, rows_b)
    if metric == "bleu" and not (has_bleu(cols_a) and has_bleu(cols_b)):
        raise ValueError("comparing BLEU needs both steps' answers and reference answers")
    n_rows = len(cols_a)
    values_a = _num(rows_a.get(metric) or [None] * n_rows)
    values_b = _num(rows_b.get(metric) or [None] * n_rows)
    both = ~np.isnan(values_a) & ~np.isnan(values_b)
    if metric in BINARY_METRICS:
        cols_a, cols_b = cols_a[both], cols_b[both]
    result = paired_difference(
        cols_a, cols_b, lambda s: finish(s)[metric], n_resamples=n_resamples, seed=seed
    )
    if metric in BINARY_METRICS:
        test = mcnemar_exact(values_a[both] > 0.5, values_b[both] > 0.5)
        result["p_value"] = test["p_value"]
        counts = {k: test[k] for k in ("better", "worse", "unchanged")}
        name = "exact McNemar (binomial, two-sided)"
    else:
        counts = change_counts(values_a[both], values_b[both])
        name = "paired permutation (two-sided)"
    n = int(len(cols_a))
    return {"metric": metric, "n": n, **result, "test": name, **counts}


def significant(comparison: Mapping | None, alpha: float = 1 - CONFIDENCE) -> bool:
    """True when a comparison's p-value is below ``alpha``."""
    p = None if comparison is None else comparison.get("p_value")
    return p is not None and not math.isnan(p) and p < alpha
