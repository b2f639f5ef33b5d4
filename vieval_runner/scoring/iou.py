"""Batched IoU: the specimens of a step in a few ``torchvision.ops.box_iou`` calls on the model's
device (torchvision 0.29 broadcasts ``[..., N, 4] x [..., M, 4] -> [..., N, M]``), and the IoU
of 4-corner quads (Florence-2 OCR regions) through torchvision's ``xyxyxyxy`` format.

Nothing here is a hand-written IoU: our own code packs the step into padded tensors (specimens
grouped by box counts, so that one specimen with 20 boxes does not pad 100,000 others to 20)
and sets zero-union pairs (padding, or two degenerate boxes) to 0 where torchvision gives NaN."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np

from vieval_runner.records import Box

if TYPE_CHECKING:  # torch is imported on first use: the viewer imports scoring without it
    import torch

# Bound on B * P * R per launch so that specimens with hundreds of junk boxes cannot
# blow up memory for the whole step (2**24 float64 = 128 MiB); normal steps fit in one launch.
_MAX_ELEMENTS = 1 << 24


def pad_boxes(
    boxes: list[list[Box]], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-specimen box lists to ``[N, M, 4]`` (xyxy, float64 unless ``dtype``) plus a
    ``[N, M]`` validity mask."""
    import torch

    dtype = torch.float64 if dtype is None else dtype
    n = len(boxes)
    m = max((len(b) for b in boxes), default=0)
    arr = np.zeros((n, m, 4), dtype=np.float64)
    mask = np.zeros((n, m), dtype=bool)
    for i, bs in enumerate(boxes):
        if bs:
            arr[i, : len(bs)] = [(b.x1, b.y1, b.x2, b.y2) for b in bs]
            mask[i, : len(bs)] = True
    # One host-to-device copy per tensor rather than one per box.
    return (
        torch.from_numpy(arr).to(device=device, dtype=dtype),
        torch.from_numpy(mask).to(device=device),
    )


def batched_box_iou(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """IoU of ``[..., P, 4]`` against ``[..., R, 4]`` xyxy boxes -> ``[..., P, R]``.

    ``torchvision.ops.box_iou`` (batched), except that a pair with zero union (padding, or two
    degenerate boxes) gives 0 where torchvision divides 0 by 0 into NaN.
    """
    import torch
    from torchvision.ops import box_area, box_iou

    # union = area_p + area_r - inter, and inter is 0 whenever union could be <= 0 (a degenerate
    # or inverted box has no intersection), so "union > 0" is "area_p + area_r > 0": no NaN
    # (nor a NaN coordinate) reaches the matching.
    has_union = box_area(pred)[..., :, None] + box_area(ref)[..., None, :] > 0
    return torch.where(has_union, box_iou(pred, ref), 0.0)


def _bucket(count: np.ndarray) -> np.ndarray:
    # The padded size for a box count: the next power of two (0 and 1 stay), so that padding
    # at most doubles the work and a step needs only a handful of launches.
    padded = np.left_shift(1, np.ceil(np.log2(np.maximum(count, 1))).astype(np.int64))
    return np.where(count == 0, 0, padded)


def _pack(flat: np.ndarray, starts: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """Rows ``flat[starts[i] : starts[i] + counts[i]]`` of each selected specimen into a zero-
    padded ``[len(starts), width, 4]`` array (vectorized: no Python loop over boxes)."""
    out = np.zeros((len(starts), width, 4), dtype=np.float64)
    total = int(counts.sum())
    if total:
        specimen = np.repeat(np.arange(len(starts)), counts)
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        out[specimen, within] = flat[np.repeat(starts, counts) + within]
    return out


_CORNERS = attrgetter("x1", "y1", "x2", "y2")


def _flat(boxes: list[list[Box]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All boxes of the step as one ``[total, 4]`` array, with each specimen's start and count."""
    counts = np.fromiter(map(len, boxes), dtype=np.int64, count=len(boxes))
    total = int(counts.sum())
    corners = chain.from_iterable(map(_CORNERS, chain.from_iterable(boxes)))
    flat = np.fromiter(corners, dtype=np.float64, count=4 * total).reshape(total, 4)
    return flat, np.cumsum(counts) - counts, counts


def iou_groups(
    pred_boxes: list[list[Box]],
    ref_boxes: list[list[Box]],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(specimen indices [B], IoUs [B, P, R])`` for the specimens with boxes on both sides,
    grouped by padded box counts (powers of two), in launches of at most ``_MAX_ELEMENTS``
    IoUs. Padding pairs are 0. ``dtype`` defaults to float64 (thresholds compared exactly as
    pycocotools does), float32 on Apple MPS, which has no float64."""
    import torch

    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    if len(pred_boxes) != len(ref_boxes):
        raise ValueError(
            f"pred_boxes has {len(pred_boxes)} specimens but ref_boxes has {len(ref_boxes)}"
        )
    flat_p, start_p, n_p = _flat(pred_boxes)
    flat_r, start_r, n_r = _flat(ref_boxes)
    width_p, width_r = _bucket(n_p), _bucket(n_r)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in np.flatnonzero((n_p > 0) & (n_r > 0)).tolist():
        groups.setdefault((int(width_p[i]), int(width_r[i])), []).append(i)
    for (wp, wr), members in groups.items():
        idx = np.array(members)
        chunk = max(1, _MAX_ELEMENTS // (wp * wr))
        for c in range(0, len(idx), chunk):
            sel = idx[c : c + chunk]
            p = torch.from_numpy(_pack(flat_p, start_p[sel], n_p[sel], wp))
            r = torch.from_numpy(_pack(flat_r, start_r[sel], n_r[sel], wr))
            # One host-to-device copy per tensor and one device-to-host copy per launch; the
            # matching that follows is CPU work.
            yield sel, batched_box_iou(p.to(device, dtype), r.to(device, dtype)).cpu().numpy()


def step_ious(
    pred_boxes: list[list[Box]],
    ref_boxes: list[list[Box]],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> list[np.ndarray]:
    """Per-specimen ``[P_i, R_i]`` IoU matrices (numpy), computed in batched launches
    (``iou_groups``)."""
    out = [np.zeros((len(p), len(r))) for p, r in zip(pred_boxes, ref_boxes, strict=False)]
    for sel, iou in iou_groups(pred_boxes, ref_boxes, device, dtype):
        for k, i in enumerate(sel.tolist()):
            out[i] = iou[k, : len(pred_boxes[i]), : len(ref_boxes[i])]
    return out


def quad_iou(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """IoU of ``[P, 8]`` against ``[R, 8]`` quads ``(x1, y1, ..., x4, y4)`` -> ``[P, R]``.

    ``torchvision.ops.box_iou(fmt="xyxyxyxy")``: corners in the order top-left, top-right,
    bottom-right, bottom-left (Florence-2 OCR-with-region's order). torchvision reads each quad
    as the rotated rectangle through its first three corners (the fourth is implied), so the
    IoU is exact for rectangles, the quads Florence-2 writes up to its 1000-bin quantization.
    torchvision's rotated kernel takes 2-D inputs only (no batch dimension), hence one call per
    specimen. The result is float32 whatever the input (torchvision's rotated kernel returns
    float32). Pairs of zero-area quads give 0, not NaN.
    """
    import torch
    from torchvision.ops import box_iou

    if pred.shape[0] == 0 or ref.shape[0] == 0:
        return torch.zeros(pred.shape[0], ref.shape[0], dtype=torch.float32, device=pred.device)
    iou = box_iou(pred, ref, fmt="xyxyxyxy")
    return torch.where(torch.isnan(iou), 0.0, iou)
