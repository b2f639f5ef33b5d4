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


def _matches(iou: np.ndarray, threshold: float) -> int:
    """One-to-one greedy matches (highest IoU first) with IoU >= threshold in an (n, m) matrix."""
    pairs = np.argwhere(iou >= threshold)
    if len(pairs) == 0:
        return 0
    if len(pairs) == 1:
        return 1
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")
    used_p, used_r, n = set(), set(), 0
    for p, r in pairs[order]:
        if p not in used_p and r not in used_r:
            used_p.add(p)
            used_r.add(r)
            n += 1
    return n


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
    resized = any(
        s is not None and tuple(map(float, s)) != tuple(map(float, i))
        for s, i in zip(input_sizes, image_sizes, strict=True)
    )
    if not resized and configured != "input_pixel":
        frames.remove("input_pixel")
    fit = FrameFit(configured=configured)
    tp = np.zeros(len(frames), dtype=np.int64)
    for raw, refs, size, insize in zip(raw_boxes, ref_boxes, image_sizes, input_sizes, strict=True):
        r = np.asarray(refs, dtype=np.float64).reshape(-1, 4)
        p = np.asarray(raw, dtype=np.float64).reshape(-1, 4)
        fit.n_ref += len(r)
        fit.n_pred += len(p)
        if not len(r) or not len(p):
            continue
        wh = np.asarray(size, dtype=np.float64)
        iwh = np.asarray(insize if insize is not None else size, dtype=np.float64)
        scale = np.stack([_scales(f, wh[None], iwh[None])[0] for f in frames])  # (F, 2)
        boxes = p[None] * np.tile(scale, 2)[:, None, :]  # (F, n, 4) in pixels
        x = np.sort(np.clip(boxes[..., 0::2], 0, wh[0]), axis=-1)
        y = np.sort(np.clip(boxes[..., 1::2], 0, wh[1]), axis=-1)
        iw = np.clip(np.minimum(x[..., None, 1], r[None, None, :, 2])
                     - np.maximum(x[..., None, 0], r[None, None, :, 0]), 0, None)  # fmt: skip
        ih = np.clip(np.minimum(y[..., None, 1], r[None, None, :, 3])
                     - np.maximum(y[..., None, 0], r[None, None, :, 1]), 0, None)  # fmt: skip
        inter = iw * ih  # (F, n, m)
        area_p = ((x[..., 1] - x[..., 0]) * (y[..., 1] - y[..., 0]))[..., None]
        area_r = ((r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1]))[None, None, :]
        union = area_p + area_r - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        best = iou.max(axis=(1, 2))
        for k in np.nonzero(best >= iou_threshold)[0]:
            tp[k] += _matches(iou[k], iou_threshold)
    total = fit.n_pred + fit.n_ref
    fit.f1 = {f: (2.0 * int(t) / total if total else 0.0) for f, t in zip(frames, tp, strict=True)}
    if not total:
        return fit
    fit.best = max(frames, key=lambda f: fit.f1[f])  # first (configured) wins ties
    gain = fit.f1[fit.best] - fit.f1[configured]
    fit.fires = fit.best != configured and gain >= margin and fit.n_ref >= min_boxes
    return fit
