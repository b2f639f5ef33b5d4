"""Batched IoU: every specimen of a step in one ``torchvision.ops.box_iou`` call on the model's
device (torchvision >= 0.24 broadcasts ``[..., N, 4] x [..., M, 4] -> [..., N, M]``), and the
IoU of 4-corner quads (Florence-2 OCR regions) through torchvision's ``xyxyxyxy`` format.

Nothing here is a hand-written IoU: the only code of our own pads the step into tensors and
sets zero-union pairs (padding, or two degenerate boxes) to 0 where torchvision gives NaN."""

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
