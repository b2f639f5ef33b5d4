"""score_grounding's vectorized matching equals the assignment solver, specimen by specimen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from vieval_runner.records import Box
from vieval_runner.scoring import match_boxes, score_grounding
from vieval_runner.scoring.categories import grounding_category


def crowded_step(seed: int, n: int = 150) -> tuple[list[list[Box]], list[list[Box]]]:
    """Overlapping references (one prediction eligible for several of them, so the solver is
    needed), exact copies, degenerate boxes, and empty sides."""
    rng = np.random.default_rng(seed)
    preds, refs = [], []
    for _ in range(n):
        ref = []
        for _ in range(int(rng.integers(0, 9))):
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(0, 50, 2) * (rng.uniform(size=2) > 0.1)
            ref.append(Box(x, y, x + w, y + h))
        pred = [Box(*(np.array(b.as_list()) + rng.normal(0, 4, 4) * (rng.uniform() > 0.2)))
                for b in ref if rng.uniform() < 0.85]  # fmt: skip
        pred = [Box(min(b.x1, b.x2), min(b.y1, b.y2), max(b.x1, b.x2), max(b.y1, b.y2))
                for b in pred]  # fmt: skip
        pred += [Box(10, 10, 50, 50) for _ in range(int(rng.integers(0, 3)))]
        preds.append(list(rng.permutation(np.array(pred, dtype=object))) if pred else [])
        refs.append(ref)
    return preds, refs


def reference_scores(preds, refs, threshold):
    """Per specimen: torchvision IoU (NaN of zero-union pairs as 0), ``match_boxes``."""
    out = []
    for p, r in zip(preds, refs, strict=True):
        iou = np.zeros((len(p), len(r)))
        if p and r:
            t = lambda bs: torch.tensor([b.as_list() for b in bs], dtype=torch.float64)  # noqa: E731
            iou = np.nan_to_num(box_iou(t(p), t(r)).numpy(), nan=0.0)
        pairs = match_boxes(iou, threshold)
        matched = [float(iou[i, j]) for i, j in pairs]
        eligible = iou >= threshold
        one_to_one = (eligible.sum(0) <= 1).all() and (eligible.sum(1) <= 1).all()
        out.append((len(pairs), sum(matched) / len(pairs) if pairs else None, matched, one_to_one))
    return out


@pytest.mark.parametrize(("seed", "threshold"), [(0, 0.5), (1, 0.3), (2, 0.0)])
def test_vectorized_matching_equals_the_solver(seed, threshold):
    preds, refs = crowded_step(seed)
    got = score_grounding(preds, refs, ["ok"] * len(preds), iou_threshold=threshold)
    expected = reference_scores(preds, refs, threshold)
    for g, (tp, iou_mean, matched, _), p, r in zip(got, expected, preds, refs, strict=True):
        assert g["tp"] == tp
        assert g["iou_mean"] == iou_mean  # bit for bit: same pairs, same summation order
        category = grounding_category("ok", len(p), tp, len(p) - tp, len(r) - tp,
                                      min(matched, default=None), 0.75)  # fmt: skip
        assert g["failure_category"] == category
    solver = sum(not e[3] for e in expected)
    assert 10 < solver < len(expected) - 10  # both paths (vectorized and solver) are exercised
