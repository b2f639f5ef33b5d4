"""Facts the viewer derives from stored rows: JSON-safe values, box matches for colouring,
best step and overfitting signal, failure actions.

Where ``vieval_runner.scoring`` defines the same thing (matching, best step, overfitting,
actions) it is used, so the page never disagrees with the stored scores; a small local
fallback keeps the viewer usable without it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

GROUNDING_METRICS = ("f1", "iou_mean")
VQA_METRICS = ("exact_match", "token_f1")
# Which per-step metric picks the best checkpoint, per task.
PRIMARY = {"grounding": "f1", "vqa": "token_f1"}
# Scoring's defaults: a pair matches at IoU >= 0.5; a match below 0.75 is "loose".
MATCH_IOU = 0.5
TIGHT_IOU = 0.75
AGGREGATE_KEYS = (
    *("precision", "recall", "f1", "macro_f1", "iou_mean", "acc_at_50", "ap50", "ap"),
    *("exact_match", "vqa_accuracy", "token_f1", "bleu", "rouge_l", "anls", "parse_failure_rate"),
)

FALLBACK_ACTIONS = {
    "good": "Nothing to do: the prediction matches the reference.",
    "loose": "Boxes land on the object but loosely: check the coordinate convention / resize "
    "mapping, or train longer.",
    "missed": "Reference objects were not found: check the training targets, raise "
    "max_new_tokens if the output is cut, or train longer.",
    "false_positive": "Boxes with no matching reference: add negatives or check label noise.",
    "inconsistent": "Boxes both missing and extra: look at the raw output and the coordinate "
    "convention.",
    "unparseable": "The output could not be parsed: check output_format, the chat template "
    "and max_new_tokens.",
    "incomplete": "The answer is right but partial: raise max_new_tokens or train on complete "
    "answers.",
    "hallucination": "The answer asserts content absent from the reference: check image-text "
    "alignment in the data.",
    "format_mismatch": "The answer has the wrong shape or length: align the prompt with the "
    "training data.",
    "wrong": "The answer is wrong: more or cleaner data for this question type.",
}


@functools.cache
def _scoring() -> Any:
    try:
        import vieval_runner.scoring as scoring
    except Exception:  # absent or broken: fall back to the local definitions below
        return None
    return scoring


def scoring_module() -> Any:
    """``vieval_runner.scoring``, or None where it cannot be imported."""
    return _scoring()


def warm_up() -> None:
    """Import scoring now (it pulls in torch: seconds) rather than on the first request."""
    _scoring()


def failure_actions() -> dict[str, str]:
    """Suggested action per failure category."""
    scoring = _scoring()
    actions = dict(FALLBACK_ACTIONS)
    if scoring is not None:
        actions.update({str(k): str(v) for k, v in scoring.FAILURE_ACTIONS.items()})
    return actions


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (``JSON.parse`` rejects them), bytes are dropped."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if not isinstance(v, bytes | bytearray)}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def boxes(rows: list[dict] | None) -> list[list]:
    """Store box structs -> compact ``[x1, y1, x2, y2, label, score]`` arrays."""
    return [
        clean(
            [
                b.get("x1"),
                b.get("y1"),
                b.get("x2"),
                b.get("y2"),
                b.get("label") or "",
                b.get("score"),
            ]
        )
        for b in rows or []
        if b is not None
    ]


def image_type(data: bytes) -> tuple[str, str]:
    """(MIME type, file extension) sniffed from image bytes."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg", "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png", "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif", "gif"
    return "application/octet-stream", "bin"


def _iou_matrix(pred: list[list], ref: list[list]) -> np.ndarray:
    p = np.asarray([b[:4] for b in pred], dtype=np.float64).reshape(-1, 4)
    r = np.asarray([b[:4] for b in ref], dtype=np.float64).reshape(-1, 4)
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_r = (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])
    lt = np.maximum(p[:, None, :2], r[None, :, :2])
    rb = np.minimum(p[:, None, 2:], r[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_p[:, None] + area_r[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_matches(pred: list[list], ref: list[list]) -> list[list | None]:
    """For each predicted box, ``[ref index, IoU]`` of its match, or None (a false positive).

    Same one-to-one matching as scoring (most matches, then highest IoU sum).
    """
    if not pred or not ref:
        return [None] * len(pred)
    iou = _iou_matrix(pred, ref)
    scoring = _scoring()
    if scoring is not None:
        pairs = scoring.match_boxes(iou, MATCH_IOU)
    else:  # greedy by IoU: the same result in all but contrived cases
        pairs, used_p, used_r = [], set(), set()
        for flat in np.argsort(-iou, axis=None):
            i, j = np.unravel_index(flat, iou.shape)
            if iou[i, j] >= MATCH_IOU and i not in used_p and j not in used_r:
                pairs.append((int(i), int(j)))
                used_p.add(i)
                used_r.add(j)
    out: list[list | None] = [None] * len(pred)
    for i, j in pairs:
        out[i] = [int(j), round(float(iou[i, j]), 4)]
    return out


def best_and_overfit(aggs: list[dict], metric: str) -> tuple[dict | None, dict | None]:
    """Best step by ``metric`` and the overfitting signal (an earlier step clearly better)."""
    by_step = {a["step"]: a for a in aggs if a.get("step") is not None}
    scoring = _scoring()
    if scoring is not None:
        best_step = scoring.best_step(by_step, metric)
        overfit = scoring.overfitting_signal(by_step, metric)
    else:
        vals = [(s, a[metric]) for s, a in sorted(by_step.items()) if a.get(metric) is not None]
        tie = len(vals) > 1 and len({v for _, v in vals}) == 1  # none better (best_step)
        best_step = max(vals, key=lambda sv: sv[1])[0] if vals and not tie else None
        overfit = None
        if vals and best_step != vals[-1][0] and dict(vals)[best_step] - vals[-1][1] >= 0.05:
            overfit = {"best_step": best_step, "best_value": dict(vals)[best_step],
                       "last_step": vals[-1][0], "last_value": vals[-1][1]}  # fmt: skip
    if best_step is None:
        return None, None
    best = {"step": best_step, "metric": metric, "value": by_step[best_step][metric]}
    return best, (clean(dict(overfit)) | {"metric": metric} if overfit else None)
