"""IoU through torchvision: batched over the step, zero-union pairs explicit, quads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from vieval_runner.records import Box
from vieval_runner.scoring.iou import batched_box_iou, pad_boxes, quad_iou, step_ious


def degenerate_step(seed: int, n: int = 200) -> tuple[list[list[Box]], list[list[Box]]]:
    """Random boxes with zero-width, zero-height and point boxes mixed in, and specimens with
    no boxes on either side (so the padding produces zero-union pairs)."""
    rng = np.random.default_rng(seed)

    def boxes(k: int) -> list[Box]:
        out = []
        for _ in range(k):
            x, y = rng.uniform(0, 80, 2)
            w, h = rng.uniform(0, 40, 2)
            kind = rng.integers(0, 5)
            w = 0.0 if kind in (1, 3) else w
            h = 0.0 if kind in (2, 3) else h
            out.append(Box(x, y, x + w, y + h))
        return out

    preds = [boxes(int(rng.integers(0, 7))) for _ in range(n)]
    refs = [boxes(int(rng.integers(0, 5))) for _ in range(n)]
    preds[0], refs[1] = [], []
    return preds, refs


def as_tensor(boxes: list[Box]) -> torch.Tensor:
    return torch.tensor([b.as_list() for b in boxes], dtype=torch.float64).reshape(-1, 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_step_ious_equal_torchvision_bit_for_bit_except_zero_union(seed):
    preds, refs = degenerate_step(seed)
    for p, r, got in zip(preds, refs, step_ious(preds, refs), strict=True):
        assert got.shape == (len(p), len(r))
        assert not np.isnan(got).any()
        if p and r:
            expect = box_iou(as_tensor(p), as_tensor(r)).numpy()  # torchvision: the reference
            zero_union = np.isnan(expect)  # two degenerate boxes: 0 / 0
            np.testing.assert_array_equal(got[~zero_union], expect[~zero_union])
            assert (got[zero_union] == 0).all()


def test_batched_over_leading_dimensions_and_padding_is_never_nan():
    preds, refs = degenerate_step(4, n=30)
    p, pm = pad_boxes(preds)
    r, rm = pad_boxes(refs)
    iou = batched_box_iou(p, r)
    assert iou.shape == (30, p.shape[1], r.shape[1])
    assert not torch.isnan(iou).any()
    assert (iou[~pm] == 0).all() and (iou.transpose(1, 2)[~rm] == 0).all()  # padding pairs
    # extra leading dimensions broadcast like torchvision's [..., N, 4]
    two = batched_box_iou(torch.stack([p, p]), torch.stack([r, r]))
    torch.testing.assert_close(two, torch.stack([iou, iou]), rtol=0, atol=0)


def test_zero_union_pairs_are_zero_and_nan_coordinates_do_not_leak():
    point = torch.tensor([[[5.0, 5.0, 5.0, 5.0]]], dtype=torch.float64)
    line = torch.tensor([[[0.0, 5.0, 10.0, 5.0]]], dtype=torch.float64)
    nan = torch.tensor([[[math.nan, 0.0, 1.0, 1.0]]], dtype=torch.float64)
    assert torch.isnan(box_iou(point[0], line[0])).all()  # what torchvision gives
    assert batched_box_iou(point, line).item() == 0.0
    assert batched_box_iou(nan, line).item() == 0.0


def square_quad(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    return [x1, y1, x2, y1, x2, y2, x1, y2]  # top-left, top-right, bottom-right, bottom-left


def test_quad_iou_of_axis_aligned_quads_equals_box_iou():
    rng = np.random.default_rng(0)
    boxes = [tuple(sorted(rng.uniform(0, 100, 2))) + tuple(sorted(rng.uniform(0, 100, 2)))
             for _ in range(12)]  # fmt: skip
    xyxy = torch.tensor([(a, c, b, d) for a, b, c, d in boxes], dtype=torch.float64)
    quads = torch.tensor([square_quad(*b) for b in xyxy.tolist()], dtype=torch.float64)
    got = quad_iou(quads[:7], quads[7:])
    assert got.dtype == torch.float32  # torchvision's rotated kernel returns float32
    expect = box_iou(xyxy[:7], xyxy[7:])
    torch.testing.assert_close(got.double(), expect, rtol=0, atol=1e-6)
    assert 0 < (expect > 0).sum() < expect.numel()  # overlapping and disjoint pairs both occur


def test_quad_iou_rotated_square():
    # A diamond with corners on the midpoints of a 2x2 square's sides covers half of it:
    # IoU = 2 / 4 (worked by hand).
    square = torch.tensor([square_quad(0, 0, 2, 2)], dtype=torch.float64)
    diamond = torch.tensor([[1, 0, 2, 1, 1, 2, 0, 1]], dtype=torch.float64)
    assert quad_iou(diamond, square).item() == pytest.approx(0.5, abs=1e-6)


def test_quad_iou_degenerate_and_empty():
    zero = torch.zeros(2, 8, dtype=torch.float64)
    square = torch.tensor([square_quad(0, 0, 2, 2)], dtype=torch.float64)
    got = quad_iou(zero, torch.cat([zero, square]))
    assert got.shape == (2, 3) and not torch.isnan(got).any() and (got == 0).all()
    assert quad_iou(torch.zeros(0, 8), square).shape == (0, 1)
