"""COCO-style average precision (AP@0.5 and AP@[.5:.95]) for boxes that carry scores.

A re-implementation of pycocotools ``COCOeval`` (bbox, area "all", no crowd regions) for one
class: each specimen is a COCO image and every box belongs to the specimen's one phrase, so
matching is class-agnostic. Agreement with ``COCOeval`` is tested to 1e-6.
"""

from __future__ import annotations

import numpy as np

from vieval_runner.records import Box

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


def _match_image(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``[T, D]`` bool: is detection d (already score-sorted) a TP at threshold t.

    COCO's greedy rule: in score order each detection takes the still-free reference with
    the highest IoU >= t (ties go to the later reference, as in ``evaluateImg``).
    """
    n_det, n_ref = ious.shape
    matched = np.zeros((len(thresholds), n_det), dtype=bool)
    if n_det == 0 or n_ref == 0:
        return matched
    for ti, t in enumerate(thresholds):
        floor = min(t, 1 - 1e-10)
        taken = np.zeros(n_ref, dtype=bool)
        for d in range(n_det):
            cand = np.where(~taken & (ious[d] >= floor), ious[d], -1.0)
            best = cand.max()
            if best < 0:
                continue
            g = n_ref - 1 - int(np.argmax(cand[::-1] == best))  # last index holding the max
            taken[g] = True
            matched[ti, d] = True
    return matched


def coco_average_precision(
    pred_boxes: list[list[Box]],
    ref_boxes: list[list[Box]],
    ious: list[np.ndarray],
    *,
    max_dets: int = 100,
) -> dict[str, float] | None:
    """``{"ap", "ap50", "ap75"}`` over all specimens, or None when it is undefined.

    Undefined: no reference box in the whole step, no predicted box at all, or some predicted
    box without a score (AP ranks by score; an unscored box cannot be ranked).
    ``ious[i]`` is specimen i's ``[P_i, R_i]`` IoU matrix in the order of ``pred_boxes[i]``.
    """
    n_ref = sum(len(r) for r in ref_boxes)
    all_preds = [b for bs in pred_boxes for b in bs]
    if n_ref == 0 or not all_preds or any(b.score is None for b in all_preds):
        return None
    scores, hits = [], []
    for preds, iou in zip(pred_boxes, ious, strict=True):
        if not preds:
            continue
        s = np.array([b.score for b in preds], dtype=np.float64)
        order = np.argsort(-s, kind="mergesort")[:max_dets]
        scores.append(s[order])
        hits.append(_match_image(iou[order], COCO_IOU_THRESHOLDS))
    score = np.concatenate(scores)
    hit = np.concatenate(hits, axis=1)
    order = np.argsort(-score, kind="mergesort")
    tp = np.cumsum(hit[:, order], axis=1, dtype=np.float64)
    fp = np.cumsum(~hit[:, order], axis=1, dtype=np.float64)
    n_det = tp.shape[1]
    precision = np.zeros((len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_THRESHOLDS)))
    for ti in range(len(COCO_IOU_THRESHOLDS)):
        rc = tp[ti] / n_ref
        pr = tp[ti] / (fp[ti] + tp[ti] + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope, as COCO's loop
        idx = np.searchsorted(rc, COCO_RECALL_THRESHOLDS, side="left")
        ok = idx < n_det
        precision[ti, ok] = pr[idx[ok]]
    return {
        "ap": float(np.mean(precision)),
        "ap50": float(np.mean(precision[0])),
        "ap75": float(np.mean(precision[5])),
    }
