"""The coordinate-frame check: the same numbers scored under every plausible frame."""

from __future__ import annotations

import random
import time

import pytest

from vieval_runner.scoring.frames import fit_frames

W, H = 1280, 960  # original image
IW, IH = 644, 476  # Qwen2.5-VL's resized input for it (multiples of 28)


def _step(n: int = 20, seed: int = 0):
    """n specimens, one reference box each, and the model's boxes in resized-input pixels."""
    rng = random.Random(seed)
    raws, refs = [], []
    for _ in range(n):
        x1, y1 = rng.uniform(0, W * 0.6), rng.uniform(0, H * 0.6)
        x2, y2 = x1 + rng.uniform(80, W * 0.35), y1 + rng.uniform(80, H * 0.35)
        refs.append([[x1, y1, x2, y2]])
        raws.append([[x1 * IW / W, y1 * IH / H, x2 * IW / W, y2 * IH / H]])
    return raws, refs, [(W, H)] * n, [(IW, IH)] * n


def test_resized_pixels_read_as_0_1000_are_caught():
    raws, refs, sizes, inputs = _step()
    fit = fit_frames(raws, refs, sizes, inputs, "relative_1000")
    assert fit.best == "input_pixel" and fit.best_f1 == pytest.approx(1.0)
    assert fit.configured_f1 < 0.5 and fit.fires
    assert set(fit.f1) == {"relative_1000", "pixel", "input_pixel", "relative_1024", "normalized_1"}


def test_the_configured_frame_that_fits_does_not_fire():
    raws, refs, sizes, inputs = _step()
    fit = fit_frames(raws, refs, sizes, inputs, "input_pixel")
    assert fit.best == "input_pixel" and not fit.fires


def test_too_few_boxes_do_not_fire_and_no_resize_drops_input_pixel():
    raws, refs, sizes, inputs = _step(n=5)
    assert not fit_frames(raws, refs, sizes, inputs, "relative_1000").fires  # 5 < min_boxes
    fit = fit_frames(raws, refs, sizes, [None] * 5, "pixel")
    assert "input_pixel" not in fit.f1


def test_ties_keep_the_configured_frame_and_nothing_scores_zero():
    fit = fit_frames([[]], [[]], [(W, H)], [None], "relative_1000")
    assert fit.best is None and not fit.fires
    # no prediction matches under any frame: every F1 is 0, the configured frame is "best"
    fit = fit_frames([[[0, 0, 1, 1]]] * 12, [[[500, 500, 900, 900]]] * 12, [(W, H)] * 12,
                     [None] * 12, "relative_1000")  # fmt: skip
    assert fit.best == "relative_1000" and not fit.fires


def test_micro_f1_counts_unmatched_predictions_and_references():
    # 0-1 frame, two specimens: one exact box, one extra prediction, one missed reference.
    raws = [[[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]], []]
    refs = [[[0, 0, 640, 480]], [[10, 10, 20, 20]]]
    fit = fit_frames(raws, refs, [(W, H)] * 2, [None] * 2, "normalized_1", min_boxes=1)
    # TP 1, predictions 2, references 2: F1 = 2 * 1 / (2 + 2)
    assert fit.f1["normalized_1"] == pytest.approx(0.5)


def test_matching_is_greedy_by_iou_where_candidates_share_a_box():
    """The check matches greedily by IoU (highest first), as its docstring says. Specimen 0:
    P1 overlaps A (IoU 0.9) and B (0.667), P2 only A (0.8); greedy takes P1-A and leaves
    P2 and B unmatched (the optimum would pair both). Specimen 1: one exact, lone pair."""
    a, b = [0, 0, 100, 100], [0, 0, 60, 100]
    p1, p2 = [0, 0, 90, 100], [20, 0, 100, 100]
    raws = [[p1, p2], [[10, 10, 50, 50]]]
    refs = [[a, b], [[10, 10, 50, 50]]]
    fit = fit_frames(raws, refs, [(500, 400)] * 2, [None] * 2, "pixel", min_boxes=1)
    # TP 2 (P1-A, the lone pair) of 3 predictions and 3 references: F1 = 2 * 2 / (3 + 3)
    assert fit.f1["pixel"] == pytest.approx(4 / 6)


def test_a_large_step_is_cheap():
    raws, refs, sizes, inputs = _step(n=2000, seed=3)
    start = time.perf_counter()
    fit_frames(raws, refs, sizes, inputs, "relative_1000")
    assert time.perf_counter() - start < 1.0  # about 0.06 s on a 2-core CPU


def test_a_box_without_four_numbers_is_refused():
    with pytest.raises(ValueError, match="four numbers each; got 3 numbers in 1 boxes"):
        fit_frames([[[1, 2, 3]]], [[[1, 2, 3, 4]]], [(10, 10)], [None], "pixel")
