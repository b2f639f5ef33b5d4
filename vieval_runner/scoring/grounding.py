"""Grounding scores: per-specimen matching and counts, and the per-step aggregate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

from vieval_runner.records import Box
from vieval_runner.scoring.categories import (
    FAILURE_ACTIONS,
    PARSE_FAILURE_STATUSES,
    grounding_category,
)
from vieval_runner.scoring.coco_ap import coco_average_precision
from vieval_runner.scoring.iou import iou_groups
from vieval_runner.scoring.stats import mean_present

if TYPE_CHECKING:
    import torch

# RefCOCO's accuracy is defined at IoU 0.5 whatever the matching threshold is.
ACC_IOU = 0.5


def match_boxes(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one (pred, ref) pairs with IoU >= threshold: most matches, then highest IoU sum.

    Hungarian assignment on ``C + IoU`` for eligible pairs (0 otherwise) with ``C`` larger than
    any possible match count, so the number of matches is maximised first and the IoU sum
    second. Unlike greedy-by-IoU it never loses a match to a locally better pair, and the
    result does not depend on the order in which the model wrote its boxes.
    """
    eligible = iou >= threshold
    if not eligible.any():
        return []
    n_pred, n_ref = iou.shape
    if n_pred == 1 or n_ref == 1:  # a single row/column: the best eligible pair is optimal
        i, j = np.unravel_index(int(np.argmax(np.where(eligible, iou, -1.0))), iou.shape)
        return [(int(i), int(j))]
    weight = np.where(eligible, min(n_pred, n_ref) + 1 + iou, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if eligible[i, j]]


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    # Empty cases: nothing predicted and nothing to find is perfect (1, 1, 1); exactly one side
    # empty is a complete miss (0, 0, 0); see docs/metrics.md.
    if tp + fp == 0 and tp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return precision, recall, f1


def _top_index(preds: list[Box]) -> int:
    # RefCOCO scores the model's one answer: the highest-scored box when all are scored,
    # else the first one written.
    if all(b.score is not None for b in preds):
        return int(np.argmax([b.score for b in preds]))
    return 0


def _label_mask(preds: list[Box], refs: list[Box]) -> np.ndarray:
    norm = [b.label.strip().lower() for b in preds], [b.label.strip().lower() for b in refs]
    return np.array([[p == r for r in norm[1]] for p in norm[0]], dtype=bool).reshape(
        len(preds), len(refs)
    )


def _settle_group(
    iou: np.ndarray,
    sel: np.ndarray,
    pred_boxes: list[list[Box]],
    ref_boxes: list[list[Box]],
    threshold: float,
    into: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Matchings of a group of specimens (``iou``: ``[B, P, R]``, zero-padded) whose eligible
    pairs are already one-to-one: then they are the only maximum matching (what
    ``match_boxes`` returns), so no assignment is solved. Others stay unsettled."""
    settled, tp_of, iou_sum_of, iou_min_of = into
    n_p = np.array([len(pred_boxes[i]) for i in sel.tolist()])
    n_r = np.array([len(ref_boxes[i]) for i in sel.tolist()])
    valid = (np.arange(iou.shape[1])[None, :, None] < n_p[:, None, None]) & (
        np.arange(iou.shape[2])[None, None, :] < n_r[:, None, None]
    )
    eligible = (iou >= threshold) & valid
    one_to_one = (eligible.sum(axis=2) <= 1).all(axis=1) & (eligible.sum(axis=1) <= 1).all(axis=1)
    per_row = np.where(eligible, iou, 0.0).sum(axis=2)  # one matched IoU (or 0) per row
    iou_sum = np.zeros(len(sel))
    for row in range(per_row.shape[1]):  # row order, as Python's sum over the pairs
        iou_sum = iou_sum + per_row[:, row]
    settled[sel] = one_to_one
    tp_of[sel] = eligible.sum(axis=(1, 2))
    iou_sum_of[sel] = iou_sum
    iou_min_of[sel] = np.where(eligible, iou, np.inf).min(axis=(1, 2))


def score_grounding(
    pred_boxes: list[list[Box]],
    ref_boxes: list[list[Box]],
    parse_statuses: list[str],
    *,
    iou_threshold: float = 0.5,
    tight_iou: float = 0.75,
    device: str | torch.device = "cpu",
    label_aware: bool = False,
) -> list[dict]:
    """Per-specimen grounding metrics for a whole step (all IoUs in batched launches).

    Each dict: ``tp, fp, fn, n_pred, n_ref, precision, recall, f1, iou_mean, acc_at_50,
    failure_category, failure_action``. Matching is class-agnostic unless ``label_aware``.
    """
    if not len(pred_boxes) == len(ref_boxes) == len(parse_statuses):
        raise ValueError(
            f"score_grounding: {len(pred_boxes)} predictions, {len(ref_boxes)} references and "
            f"{len(parse_statuses)} parse statuses; they must be one per specimen"
        )
    n = len(pred_boxes)
    ious = [np.zeros((len(p), len(r))) for p, r in zip(pred_boxes, ref_boxes, strict=True)]
    # Per specimen: is the matching settled without the assignment solver, and if so its
    # match count, IoU sum and smallest matched IoU (filled group by group, vectorized).
    settled = np.full(n, not label_aware)
    tp_of, iou_sum_of, iou_min_of = np.zeros(n, dtype=np.int64), np.zeros(n), np.full(n, np.inf)
    for sel, iou in iou_groups(pred_boxes, ref_boxes, device=device):
        for k, i in enumerate(sel.tolist()):
            ious[i] = iou[k, : len(pred_boxes[i]), : len(ref_boxes[i])]
        if not label_aware:
            into = (settled, tp_of, iou_sum_of, iou_min_of)
            _settle_group(iou, sel, pred_boxes, ref_boxes, iou_threshold, into)
    out = []
    for i, (preds, refs, status, iou) in enumerate(
        zip(pred_boxes, ref_boxes, parse_statuses, ious, strict=True)
    ):
        if settled[i]:
            tp = int(tp_of[i])
            iou_sum = float(iou_sum_of[i])
            iou_min = float(iou_min_of[i]) if tp else None
        else:
            eligible_iou = iou * _label_mask(preds, refs) if label_aware else iou
            pairs = match_boxes(eligible_iou, iou_threshold)
            tp = len(pairs)
            matched = [float(iou[a, b]) for a, b in pairs]
            iou_sum, iou_min = sum(matched), min(matched, default=None)
        fp, fn = len(preds) - tp, len(refs) - tp
        precision, recall, f1 = _prf(tp, fp, fn)
        acc = None
        if len(refs) == 1:
            acc = float(bool(preds) and iou[_top_index(preds), 0] >= ACC_IOU)
        category = grounding_category(status, len(preds), tp, fp, fn, iou_min, tight_iou)
        out.append(
            {
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "n_pred": len(preds),
                "n_ref": len(refs),
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "iou_mean": iou_sum / tp if tp else None,
                "acc_at_50": acc,
                "failure_category": category,
                "failure_action": FAILURE_ACTIONS[category],
            }
        )
    return out


def aggregate_grounding(
    per_specimen: list[dict],
    parse_statuses: list[str],
    pred_boxes: list[list[Box]] | None = None,
    ref_boxes: list[list[Box]] | None = None,
    *,
    max_dets: int = 100,
) -> dict:
    """Per-step grounding metrics: micro and macro P/R/F1, mean IoU, acc@0.5, parse-failure
    rate, and COCO AP50 / AP@[.5:.95] when every predicted box carries a score."""
    if len(per_specimen) != len(parse_statuses):
        raise ValueError(
            f"aggregate_grounding: {len(per_specimen)} specimens but "
            f"{len(parse_statuses)} parse statuses"
        )
    n = len(per_specimen)
    tp = sum(d["tp"] for d in per_specimen)
    fp = sum(d["fp"] for d in per_specimen)
    fn = sum(d["fn"] for d in per_specimen)
    precision, recall, f1 = _prf(tp, fp, fn) if n else (None, None, None)
    iou_sum = sum(d["iou_mean"] * d["tp"] for d in per_specimen if d["iou_mean"] is not None)
    ap = None
    if pred_boxes is not None and ref_boxes is not None:
        if not len(pred_boxes) == len(ref_boxes) == n:
            raise ValueError(
                f"aggregate_grounding: {n} specimens but {len(pred_boxes)} prediction and "
                f"{len(ref_boxes)} reference box lists"
            )
        ap = coco_average_precision(pred_boxes, ref_boxes, max_dets=max_dets)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "macro_precision": mean_present([d["precision"] for d in per_specimen]),
        "macro_recall": mean_present([d["recall"] for d in per_specimen]),
        "macro_f1": mean_present([d["f1"] for d in per_specimen]),
        "iou_mean": iou_sum / tp if tp else None,
        "acc_at_50": mean_present([d["acc_at_50"] for d in per_specimen]),
        "parse_failure_rate": (
            sum(s in PARSE_FAILURE_STATUSES for s in parse_statuses) / n if n else None
        ),
        "ap50": None if ap is None else ap["ap50"],
        "ap": None if ap is None else ap["ap"],
        "n_specimens": n,
    }
