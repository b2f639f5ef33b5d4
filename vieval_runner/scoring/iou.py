"""Batched IoU: every specimen of a step in one tensor computation on the model's device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vieval_runner.records import Box

if TYPE_CHECKING:  # torch is imported on first use: the viewer imports scoring without it
    import torch

# Bound on N * Pmax * Rmax per launch so that one specimen with hundreds of junk boxes cannot
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
    """IoU of ``[N, P, 4]`` against ``[N, R, 4]`` xyxy boxes -> ``[N, P, R]``.

    Same formula as ``torchvision.ops.box_iou`` applied image by image, except that a pair
    with zero union (two degenerate boxes, e.g. padding) gives 0 instead of NaN.
    """
    import torch

    area_p = (pred[..., 2] - pred[..., 0]) * (pred[..., 3] - pred[..., 1])
    area_r = (ref[..., 2] - ref[..., 0]) * (ref[..., 3] - ref[..., 1])
    lt = torch.maximum(pred[:, :, None, :2], ref[:, None, :, :2])
    rb = torch.minimum(pred[:, :, None, 2:], ref[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_p[:, :, None] + area_r[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def step_ious(
    pred_boxes: list[list[Box]],
    ref_boxes: list[list[Box]],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> list[np.ndarray]:
    """Per-specimen ``[P_i, R_i]`` IoU matrices (numpy), computed in batched launches.

    ``dtype`` defaults to float64 (thresholds compared exactly as pycocotools does), float32 on
    Apple MPS, which has no float64.
    """
    import torch

    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    if len(pred_boxes) != len(ref_boxes):
        raise ValueError(
            f"pred_boxes has {len(pred_boxes)} specimens but ref_boxes has {len(ref_boxes)}"
        )
    n = len(pred_boxes)
    p_max = max((len(b) for b in pred_boxes), default=0)
    r_max = max((len(b) for b in ref_boxes), default=0)
    chunk = max(1, _MAX_ELEMENTS // max(1, p_max * r_max))
    out: list[np.ndarray] = []
    for start in range(0, n, chunk):
        preds, refs = pred_boxes[start : start + chunk], ref_boxes[start : start + chunk]
        p, _ = pad_boxes(preds, device, dtype)
        r, _ = pad_boxes(refs, device, dtype)
        # One device-to-host copy per chunk; the matching that follows is per-specimen CPU work.
        iou = batched_box_iou(p, r).cpu().numpy()
        out.extend(
            iou[i, : len(pb), : len(rb)] for i, (pb, rb) in enumerate(zip(preds, refs, strict=True))
        )
    return out
