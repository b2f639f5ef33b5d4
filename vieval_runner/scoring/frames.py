"""Coordinate-frame check: which frame of the output's numbers fits the references best.

A model's box numbers mean nothing without their frame: pixels of the original image, pixels
of the resized model input (Qwen2.5-VL), a 0-1000 / 0-1024 grid, or 0-1. Scored in the wrong
frame, good boxes look like junk (Qwen2.5-VL's resized-pixel boxes read as 0-1000) and nothing
says why. Per step, the parsed boxes' own numbers (``Box.raw``) are mapped under each
plausible frame and scored against the references (micro F1 at IoU 0.5, one-to-one greedy
matching by IoU); the best frame is recorded, and when it beats the configured one clearly
(``margin``, on at least ``min_boxes`` reference boxes) the check says so.

Hand-written: no library scores one set of numbers under several frames. Vectorised over
frames with numpy; a step of a few thousand boxes takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

#: Frames tried for every step, in tie-break order (the configured frame wins ties first).
CANDIDATE_FRAMES: tuple[str, ...] = (
    "pixel",
    "input_pixel",
    "relative_1000",
    "relative_1024",
    "normalized_1",
)
_DIVISORS = {
    "relative_1000": 1000.0,
    "relative_999": 999.0,
    "relative_1024": 1024.0,
    "normalized_1": 1.0,
    "percent": 100.0,
}


@dataclass
class FrameFit:
    """The check's verdict for one step."""

    configured: str
    f1: dict[str, float] = field(default_factory=dict)  # frame -> micro F1@0.5
    n_ref: int = 0
    n_pred: int = 0
    best: str | None = None
    fires: bool = False  # another frame fits clearly better than the configured one

    @property
    def best_f1(self) -> float | None:
        return None if self.best is None else self.f1[self.best]

    @property
    def configured_f1(self) -> float | None:
        return self.f1.get(self.configured)


def _scales(frame: str, size: np.ndarray, input_size: np.ndarray) -> np.ndarray:
    """(n, 2) pixel-per-unit factors (sx, sy) of ``frame`` for boxes of images ``size``."""
    if frame == "pixel":
        return np.ones_like(size)
    if frame == "input_pixel":
        return size / input_size
    return size / _DIVISORS[frame]


def _greedy_matches(iou: np.ndarray, pred: np.ndarray, ref: np.ndarray, threshold: float) -> int:
    """One-to-one greedy matches (highest IoU first) among candidate pairs with IoU >=
    ``threshold`` (``pred``/``ref``: each pair's global box indices)."""
    keep = np.nonzero(iou >= threshold)[0]
    if len(keep) == 0:
        return 0
    p, r = pred[keep], ref[keep]
    # A candidate whose prediction and reference are in no other candidate is matched whatever
    # the order, so only the others go through the greedy loop (most steps have few of them).
    alone = (np.bincount(p)[p] == 1) & (np.bincount(r)[r] == 1)
    n = int(alone.sum())
    rest = keep[~alone]
    order = rest[np.argsort(-iou[rest], kind="stable")]
    used_p, used_r = set(), set()
    for a, b in zip(pred[order].tolist(), ref[order].tolist(), strict=True):
        if a not in used_p and b not in used_r:
            used_p.add(a)
            used_r.add(b)
            n += 1
    return n


def _flat(boxes: Sequence[Sequence[Sequence[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """All specimens' boxes as one (N, 4) array, and each specimen's count."""
    counts = np.fromiter(map(len, boxes), dtype=np.int64, count=len(boxes))
    numbers = chain.from_iterable(chain.from_iterable(boxes))  # no nested lists for numpy
    flat = np.fromiter(numbers, dtype=np.float64)
    if flat.size != 4 * int(counts.sum()):
        raise ValueError(f"boxes must be four numbers each; got {flat.size} numbers in "
                         f"{int(counts.sum())} boxes")  # fmt: skip
    return flat.reshape(-1, 4), counts


def fit_frames(
    raw_boxes: Sequence[Sequence[Sequence[float]]],
    ref_boxes: Sequence[Sequence[Sequence[float]]],
    image_sizes: Sequence[tuple[float, float]],
    input_sizes: Sequence[tuple[float, float] | None],
    configured: str,
    *,
    iou_threshold: float = 0.5,
    margin: float = 0.2,
    min_boxes: int = 10,
) -> FrameFit:
    """Score one step's raw box numbers under every candidate frame.

    Per specimen: ``raw_boxes`` (x1, y1, x2, y2 in the output's own units), ``ref_boxes``
    (pixels), the original image's and the model input's (W, H) (None: the same). Frames are
    ``CANDIDATE_FRAMES`` plus ``configured``; ``input_pixel`` only when some input size differs
    from its image's. ``fires`` when the best frame's F1 exceeds the configured one's by at
    least ``margin`` with at least ``min_boxes`` reference boxes.
    """
    frames = [configured] + [f for f in CANDIDATE_FRAMES if f != configured]
    sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
    inputs = np.array(
        [s if i is None else i for s, i in zip(image_sizes, input_sizes, strict=True)],
        dtype=np.float64,
    ).reshape(-1, 2)
    if configured != "input_pixel" and np.array_equal(sizes, inputs):
        frames.remove("input_pixel")
    preds, n_pred = _flat(raw_boxes)
    refs, n_ref = _flat(ref_boxes)
    fit = FrameFit(configured=configured, n_pred=int(n_pred.sum()), n_ref=int(n_ref.sum()))
    total = fit.n_pred + fit.n_ref
    if not total:
        return fit
    # every (prediction, reference) pair of the same specimen, without padding
    pairs = n_pred * n_ref
    spec = np.repeat(np.arange(len(pairs)), pairs)
    k = np.arange(int(pairs.sum())) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    p_idx = (np.cumsum(n_pred) - n_pred)[spec] + k // np.maximum(n_ref[spec], 1)
    r_idx = (np.cumsum(n_ref) - n_ref)[spec] + k % np.maximum(n_ref[spec], 1)
    # each frame's predicted boxes in pixels, clipped to the image and ordered, box by box
    box_spec = np.repeat(np.arange(len(n_pred)), n_pred)
    wh, in_wh = sizes[box_spec], inputs[box_spec]  # (N, 2) each box's image and input size
    scale = np.stack([_scales(f, wh, in_wh) for f in frames])  # (F, N, 2)
    boxes = preds[None] * np.tile(scale, 2)  # (F, N, 4)
    x = np.clip(boxes[..., 0::2], 0, wh[None, :, :1])  # (F, N, 2): x1, x2 (unordered)
    y = np.clip(boxes[..., 1::2], 0, wh[None, :, 1:])
    x1, x2 = np.minimum(x[..., 0], x[..., 1]), np.maximum(x[..., 0], x[..., 1])
    y1, y2 = np.minimum(y[..., 0], y[..., 1]), np.maximum(y[..., 0], y[..., 1])
    area_p = ((x2 - x1) * (y2 - y1))[:, p_idx]  # (F, P) from here on: one column a pair
    x1, x2, y1, y2 = x1[:, p_idx], x2[:, p_idx], y1[:, p_idx], y2[:, p_idx]
    r = refs[r_idx]
    iw = np.clip(np.minimum(x2, r[:, 2]) - np.maximum(x1, r[:, 0]), 0, None)
    ih = np.clip(np.minimum(y2, r[:, 3]) - np.maximum(y1, r[:, 1]), 0, None)
    inter = iw * ih
    union = area_p + (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1]) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)  # (F, P)
    for f, frame in enumerate(frames):
        tp = _greedy_matches(iou[f], p_idx, r_idx, iou_threshold)
        fit.f1[frame] = 2.0 * tp / total
    fit.best = max(frames, key=lambda f: fit.f1[f])  # first (configured) wins ties
    gain = fit.f1[fit.best] - fit.f1[configured]
    fit.fires = fit.best != configured and gain >= margin and fit.n_ref >= min_boxes
    return fit
