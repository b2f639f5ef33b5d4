"""Grounding scoring: batched IoU, matching, per-specimen counts, categories, aggregates, steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from vieval_runner.records import Box
from vieval_runner.scoring import (
    FAILURE_ACTIONS,
    GROUNDING_CATEGORIES,
    SCORER_VERSION,
    aggregate_grounding,
    batched_box_iou,
    best_step,
    match_boxes,
    overfitting_signal,
    pad_boxes,
    score_grounding,
    step_ious,
)
from vieval_runner.scoring import iou as iou_module


def random_boxes(rng: np.random.Generator, n: int, size: float = 100.0) -> list[Box]:
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(1, size * 0.5, (n, 2))
    return [Box(x, y, x + w, y + h) for (x, y), (w, h) in zip(xy, wh, strict=True)]


def random_step(seed: int, n: int = 40) -> tuple[list[list[Box]], list[list[Box]]]:
    rng = np.random.default_rng(seed)
    preds = [random_boxes(rng, int(rng.integers(0, 6))) for _ in range(n)]
    refs = [random_boxes(rng, int(rng.integers(0, 5))) for _ in range(n)]
    preds[0], refs[1] = [], []  # make sure both empty sides occur
    preds[2], refs[2] = [], []
    return preds, refs


def as_tensor(boxes: list[Box]) -> torch.Tensor:
    return torch.tensor([b.as_list() for b in boxes], dtype=torch.float64).reshape(-1, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_ious_equal_torchvision_per_image(seed):
    preds, refs = random_step(seed)
    ious = step_ious(preds, refs)
    assert len(ious) == len(preds)
    for p, r, got in zip(preds, refs, ious, strict=True):
        assert got.shape == (len(p), len(r))
        if p and r:
            np.testing.assert_allclose(got, box_iou(as_tensor(p), as_tensor(r)).numpy(), atol=1e-12)


def test_batched_box_iou_on_padded_tensors_matches_torchvision():
    preds, refs = random_step(7, n=10)
    p, pm = pad_boxes(preds)
    r, rm = pad_boxes(refs)
    iou = batched_box_iou(p, r)
    assert iou.shape == (10, p.shape[1], r.shape[1])
    for i in range(10):
        if preds[i] and refs[i]:
            expect = box_iou(as_tensor(preds[i]), as_tensor(refs[i]))
            got = iou[i][pm[i]][:, rm[i]]
            torch.testing.assert_close(got, expect)
    # Padding rows/columns are degenerate boxes: 0, never NaN.
    assert not torch.isnan(iou).any()


def test_step_ious_chunking_gives_same_result(monkeypatch):
    preds, refs = random_step(3)
    whole = step_ious(preds, refs)
    monkeypatch.setattr(iou_module, "_MAX_ELEMENTS", 30)  # forces many small launches
    for a, b in zip(whole, step_ious(preds, refs), strict=True):
        np.testing.assert_array_equal(a, b)


def test_step_ious_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="2 specimens but ref_boxes has 1"):
        step_ious([[], []], [[]])


def test_match_boxes_maximises_matches_not_greedy_iou():
    # Greedy by IoU takes (0, 0) = 0.9 and leaves pred 1 unmatched; two matches exist.
    iou = np.array([[0.9, 0.6], [0.6, 0.0]])
    assert sorted(match_boxes(iou, 0.5)) == [(0, 1), (1, 0)]
    # Three 0.5 matches beat two 1.0 matches (a plain max-IoU-sum assignment picks the two).
    iou = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.5], [0.5, 0.0, 0.0]])
    assert sorted(match_boxes(iou, 0.5)) == [(0, 1), (1, 2), (2, 0)]
    assert match_boxes(np.array([[0.49, 0.3]]), 0.5) == []
    assert match_boxes(np.array([[0.6], [0.8]]), 0.5) == [(1, 0)]
    assert match_boxes(np.zeros((0, 3)), 0.5) == []


def test_match_boxes_agrees_with_brute_force_on_random_matrices():
    from itertools import permutations

    rng = np.random.default_rng(0)
    for _ in range(200):
        p, r = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        iou = rng.uniform(0, 1, (p, r))
        pairs = match_boxes(iou, 0.5)
        assert len({i for i, _ in pairs}) == len(pairs) == len({j for _, j in pairs})
        best = (0, 0.0)
        for perm in permutations(range(max(p, r)), p):
            ok = [(i, j) for i, j in enumerate(perm) if j < r and iou[i, j] >= 0.5]
            best = max(best, (len(ok), sum(iou[i, j] for i, j in ok)))
        assert len(pairs) == best[0]
        assert sum(iou[i, j] for i, j in pairs) == pytest.approx(best[1])


A = Box(0, 0, 10, 10)
B = Box(50, 50, 70, 70)
FAR = Box(200, 200, 220, 220)
A_LOOSE = Box(0, 0, 10, 16)  # IoU with A = 100 / 160 = 0.625


def test_hand_examples_counts_and_categories():
    preds = [[A], [A, FAR], [], [A, FAR], [A_LOOSE], [], [A], [], [A]]
    refs = [[A], [A], [A, B], [A, B], [A], [A], [A], [], []]
    statuses = ["ok", "ok", "empty", "ok", "ok", "malformed", "truncated", "empty", "ok"]
    got = score_grounding(preds, refs, statuses)
    counts = [(d["tp"], d["fp"], d["fn"]) for d in got]
    assert counts == [(1, 0, 0), (1, 1, 0), (0, 0, 2), (1, 1, 1), (1, 0, 0), (0, 0, 1),
                      (1, 0, 0), (0, 0, 0), (0, 1, 0)]  # fmt: skip
    cats = [d["failure_category"] for d in got]
    assert cats == ["good", "false_positive", "missed", "inconsistent", "loose", "unparseable",
                    "good", "good", "false_positive"]  # fmt: skip
    assert all(d["failure_action"] == FAILURE_ACTIONS[d["failure_category"]] for d in got)
    assert (got[1]["precision"], got[1]["recall"], got[1]["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert (got[3]["precision"], got[3]["recall"], got[3]["f1"]) == (0.5, 0.5, 0.5)
    # Empty conventions: both empty is perfect, one side empty is zero.
    assert (got[7]["precision"], got[7]["recall"], got[7]["f1"]) == (1.0, 1.0, 1.0)
    assert (got[2]["precision"], got[2]["recall"], got[2]["f1"]) == (0.0, 0.0, 0.0)
    assert (got[8]["precision"], got[8]["recall"], got[8]["f1"]) == (0.0, 0.0, 0.0)
    assert got[4]["iou_mean"] == pytest.approx(0.625)
    assert got[2]["iou_mean"] is None
    # acc@0.5 only for single-reference specimens.
    assert [d["acc_at_50"] for d in got] == [1.0, 1.0, None, None, 1.0, 0.0, 1.0, None, None]


def test_thresholds_are_parameters():
    got = score_grounding([[A_LOOSE]], [[A]], ["ok"], tight_iou=0.6)
    assert got[0]["failure_category"] == "good"
    got = score_grounding([[A_LOOSE]], [[A]], ["ok"], iou_threshold=0.7)
    assert (got[0]["tp"], got[0]["failure_category"]) == (0, "inconsistent")


def test_acc_at_50_uses_top_scored_box_else_first():
    unscored = score_grounding([[FAR, A]], [[A]], ["ok"])
    assert unscored[0]["acc_at_50"] == 0.0
    assert unscored[0]["tp"] == 1  # matching still finds the second box
    scored = [Box(*FAR.as_list(), score=0.2), Box(*A.as_list(), score=0.9)]
    assert score_grounding([scored], [[A]], ["ok"])[0]["acc_at_50"] == 1.0


def test_label_aware_matching():
    preds = [[Box(0, 0, 10, 10, label="cat")]]
    refs = [[Box(0, 0, 10, 10, label="Dog")]]
    assert score_grounding(preds, refs, ["ok"])[0]["tp"] == 1
    assert score_grounding(preds, refs, ["ok"], label_aware=True)[0]["tp"] == 0
    refs = [[Box(0, 0, 10, 10, label=" Cat")]]
    assert score_grounding(preds, refs, ["ok"], label_aware=True)[0]["tp"] == 1


def test_mismatched_lengths_are_clear_errors():
    with pytest.raises(ValueError, match="2 predictions, 1 references"):
        score_grounding([[], []], [[]], ["ok", "ok"])
    with pytest.raises(ValueError, match="1 specimens but 2 parse statuses"):
        aggregate_grounding([{"tp": 0, "fp": 0, "fn": 0}], ["ok", "ok"])


def test_aggregate_micro_macro_by_hand():
    preds = [[A], [A, FAR], [], [A_LOOSE]]
    refs = [[A], [A], [A, B], [A]]
    statuses = ["ok", "ok", "malformed", "truncated"]
    per = score_grounding(preds, refs, statuses)
    agg = aggregate_grounding(per, statuses)
    # tp = 1 + 1 + 0 + 1 = 3, fp = 0 + 1 + 0 + 0 = 1, fn = 0 + 0 + 2 + 0 = 2
    assert agg["precision"] == pytest.approx(3 / 4)
    assert agg["recall"] == pytest.approx(3 / 5)
    assert agg["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert agg["macro_precision"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert agg["macro_recall"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert agg["macro_f1"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    assert agg["iou_mean"] == pytest.approx((1 + 1 + 0.625) / 3)
    assert agg["acc_at_50"] == pytest.approx(1.0)  # three single-ref specimens, all hits
    assert agg["parse_failure_rate"] == pytest.approx(2 / 4)
    assert agg["ap"] is None and agg["ap50"] is None  # no scores given
    assert agg["n_specimens"] == 4
    assert set(agg) == {"precision", "recall", "f1", "macro_precision", "macro_recall",
                        "macro_f1", "iou_mean", "acc_at_50", "parse_failure_rate", "ap50", "ap",
                        "n_specimens"}  # fmt: skip


def test_aggregate_of_nothing():
    agg = aggregate_grounding([], [])
    assert agg["n_specimens"] == 0
    assert agg["precision"] is None and agg["iou_mean"] is None and agg["acc_at_50"] is None


def test_categories_and_actions_are_complete():
    assert set(GROUNDING_CATEGORIES) <= set(FAILURE_ACTIONS)
    assert all(a.endswith(".") and len(a) > 20 for a in FAILURE_ACTIONS.values())
    assert SCORER_VERSION


@pytest.mark.gpu
def test_score_grounding_on_cuda_equals_cpu():
    preds, refs = random_step(5, n=200)
    statuses = ["ok"] * len(preds)
    cpu = score_grounding(preds, refs, statuses, device="cpu")
    gpu = score_grounding(preds, refs, statuses, device="cuda")
    for a, b in zip(cpu, gpu, strict=True):
        assert (a["tp"], a["fp"], a["fn"], a["failure_category"]) == (
            b["tp"], b["fp"], b["fn"], b["failure_category"])  # fmt: skip
        assert a["iou_mean"] == pytest.approx(b["iou_mean"], abs=1e-9) if a["tp"] else True


STEPS = {
    0: {"f1": 0.10, "parse_failure_rate": 0.9},
    100: {"f1": 0.60, "parse_failure_rate": 0.1},
    200: {"f1": 0.70, "parse_failure_rate": 0.05},
    300: {"f1": 0.70, "parse_failure_rate": 0.2},
    400: {"f1": 0.62, "parse_failure_rate": None},
}


def test_best_step():
    assert best_step(STEPS, "f1") == 200  # tie with 300: the earliest wins
    assert best_step(STEPS, "parse_failure_rate") == 200  # lower is better
    assert best_step(STEPS, "bleu") is None
    assert best_step({}, "f1") is None
    assert best_step({5: {"f1": float("nan")}, 7: {"f1": 0.1}}, "f1") == 7
    assert best_step({0: {"f1": 0.0}, 100: {"f1": 0.0}}, "f1") is None  # none is better
    assert best_step({100: {"f1": 0.0}}, "f1") == 100  # one step: it is the one there is


def test_overfitting_signal():
    sig = overfitting_signal(STEPS, "f1", min_drop=0.05)
    assert sig == {"best_step": 200, "best_value": 0.70, "last_step": 400, "last_value": 0.62,
                   "drop": pytest.approx(0.08)}  # fmt: skip
    assert overfitting_signal(STEPS, "f1", min_drop=0.1) is None
    # parse_failure_rate: last step with a value is 300 (0.2) vs best 0.05 -> rose by 0.15.
    sig = overfitting_signal(STEPS, "parse_failure_rate", min_drop=0.1)
    assert (sig["best_step"], sig["last_step"], sig["drop"]) == (200, 300, pytest.approx(0.15))
    rising = {0: {"f1": 0.1}, 100: {"f1": 0.5}}
    assert overfitting_signal(rising, "f1") is None
    assert overfitting_signal({0: {"f1": 0.1}}, "f1") is None
