"""COCO AP of scored boxes against pycocotools COCOeval and torchmetrics on the same boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vieval_runner.records import Box
from vieval_runner.scoring import aggregate_grounding, coco_average_precision, score_grounding
from vieval_runner.testing import stat_stores
from vieval_runner.testing.stat_stores import cocoeval_precision


def scored_step(seed: int, n: int = 30) -> tuple[list[list[Box]], list[list[Box]]]:
    """References plus predictions: jittered copies of references (some far off), random
    extra boxes, random scores; some specimens without references or without predictions."""
    return stat_stores.scored_step(seed, n)


def cocoeval_stats(preds, refs, max_dets=(1, 10, 100)) -> np.ndarray:
    """AP, AP50, AP75 straight from pycocotools' COCOeval (every specimen an image, one
    category), read from its accumulated precision at the last maxDets: summarize() hard-codes
    maxDets=100 for AP."""
    prec = cocoeval_precision(preds, refs, max_dets)[:, :, 0]  # area "all"
    return np.array([prec.mean(), prec[0].mean(), prec[5].mean()])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ap_equals_pycocotools(seed):
    preds, refs = scored_step(seed)
    stats = cocoeval_stats(preds, refs)
    got = coco_average_precision(preds, refs)
    assert got["ap"] == pytest.approx(stats[0], abs=1e-6)
    assert got["ap50"] == pytest.approx(stats[1], abs=1e-6)
    assert got["ap75"] == pytest.approx(stats[2], abs=1e-6)
    assert 0.0 < got["ap"] < got["ap50"] < 1.0  # the data is neither trivial nor hopeless


def test_ap_max_dets_truncation_equals_pycocotools():
    preds, refs = scored_step(11)
    stats = cocoeval_stats(preds, refs, max_dets=(1, 1, 2))  # COCOeval sorts maxDets
    got = coco_average_precision(preds, refs, max_dets=2)
    assert got["ap"] == pytest.approx(stats[0], abs=1e-6)
    assert got["ap50"] == pytest.approx(stats[1], abs=1e-6)
    full = coco_average_precision(preds, refs)
    assert full["ap"] != pytest.approx(got["ap"], abs=1e-6)  # truncation really happened


def test_ap_with_tied_scores_equals_pycocotools():
    preds, refs = scored_step(5)
    preds = [[Box(*b.as_list(), score=round(b.score, 1)) for b in bs] for bs in preds]
    stats = cocoeval_stats(preds, refs)
    got = coco_average_precision(preds, refs)
    assert got["ap"] == pytest.approx(stats[0], abs=1e-6)
    assert got["ap50"] == pytest.approx(stats[1], abs=1e-6)


def test_ap_equals_torchmetrics():
    from torchmetrics.detection import MeanAveragePrecision

    preds, refs = scored_step(8)
    metric = MeanAveragePrecision(iou_type="bbox", box_format="xyxy")

    def boxes(bs):
        return torch.tensor([b.as_list() for b in bs], dtype=torch.float64).reshape(-1, 4)

    metric.update(
        [{"boxes": boxes(bs), "scores": torch.tensor([b.score for b in bs], dtype=torch.float64),
          "labels": torch.zeros(len(bs), dtype=torch.long)} for bs in preds],
        [{"boxes": boxes(bs), "labels": torch.zeros(len(bs), dtype=torch.long)} for bs in refs],
    )  # fmt: skip
    tm = metric.compute()
    agg = aggregate_grounding(
        score_grounding(preds, refs, ["ok"] * len(preds)), ["ok"] * len(preds), preds, refs
    )
    assert agg["ap"] == pytest.approx(float(tm["map"]), abs=1e-6)
    assert agg["ap50"] == pytest.approx(float(tm["map_50"]), abs=1e-6)


def test_ap_undefined_cases():
    refs = [[Box(0, 0, 10, 10)]]
    assert coco_average_precision([[Box(0, 0, 10, 10)]], refs) is None
    assert coco_average_precision([[]], refs) is None
    scored = [[Box(0, 0, 10, 10, score=0.5)]]
    assert coco_average_precision(scored, [[]]) is None
    perfect = coco_average_precision(scored, refs)
    assert perfect == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0),
                       "ap75": pytest.approx(1.0)}  # fmt: skip


def test_per_box_token_scores_reorder_boxes_and_change_ap():
    """Each output holds a correct box and a wrong one. With the sequence confidence both share
    a score, so AP cannot tell them apart; with per-box token scores (the wrong box written with
    less confident tokens) it ranks the correct boxes first. Both equal pycocotools on the same
    scored boxes."""
    import json

    from vieval_runner.pipeline.results import parse_text
    from vieval_runner.records import Specimen

    rng = np.random.default_rng(3)
    specimens, texts, ends, logprobs, confidences = [], [], [], [], []
    for i in range(12):
        ref = [int(v) for v in rng.integers(50, 400, 2)]
        ref = [ref[0], ref[1], ref[0] + 200, ref[1] + 150]
        wrong = [(ref[0] + 500) % 900, (ref[1] + 500) % 900, 0, 0]
        wrong[2:] = [wrong[0] + 80, wrong[1] + 60]
        first, second = (ref, wrong) if i % 2 else (wrong, ref)  # order varies in the text
        parts = [json.dumps({"bbox_2d": first}), json.dumps({"bbox_2d": second})]
        text = "[" + ", ".join(parts) + "]"
        cut = len(parts[0]) + 1  # one "token" per box (+ the closing bracket)
        lp_ref, lp_wrong = -float(rng.uniform(0.05, 0.5)), -float(rng.uniform(1.0, 3.0))
        lps = [lp_ref, lp_wrong] if first is ref else [lp_wrong, lp_ref]
        texts.append(text)
        ends.append([cut, len(text) - 1, len(text)])
        logprobs.append([*lps, -0.01])
        confidences.append(float(np.exp(np.mean(logprobs[-1]))))
        spec = Specimen(f"s{i}", "grounding", "thing", 1000, 1000)
        spec.ref_boxes = [Box(*ref)]
        specimens.append(spec)

    def step_ap(per_box: bool):
        preds = [
            parse_text(s, t, None, "qwen25_vl_json", None, c, lp if per_box else None, e)
            for s, t, c, lp, e in zip(specimens, texts, confidences, logprobs, ends, strict=True)
        ]
        boxes = [p.pred_boxes for p in preds]
        refs = [s.ref_boxes for s in specimens]
        agg = aggregate_grounding(
            score_grounding(boxes, refs, ["ok"] * len(boxes)), ["ok"] * len(boxes), boxes, refs
        )
        stats = cocoeval_stats(boxes, refs)
        assert agg["ap"] == pytest.approx(stats[0], abs=1e-6)
        assert agg["ap50"] == pytest.approx(stats[1], abs=1e-6)
        return agg["ap50"], boxes

    shared_ap, shared = step_ap(per_box=False)
    per_box_ap, scored = step_ap(per_box=True)
    assert all(len({b.score for b in bs}) == 1 for bs in shared)  # one score per output
    assert all(len({b.score for b in bs}) == 2 for bs in scored)
    assert per_box_ap == pytest.approx(1.0)  # every correct box outranks every wrong one
    assert shared_ap < 0.9


def test_ap_with_degenerate_boxes_and_many_boxes_equals_pycocotools(capsys):
    """Up to 20 boxes a specimen, zero-width / zero-height / point boxes on both sides: the
    library (faster-coco-eval) equals pycocotools, and nothing is printed."""
    rng = np.random.default_rng(21)
    preds, refs = [], []
    for _ in range(150):
        ref = []
        for _ in range(int(rng.integers(0, 21))):
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.uniform(0, 80, 2) * (rng.uniform(size=2) > 0.15)  # some zero sides
            ref.append(Box(x, y, x + w, y + h))
        pred = [Box(b.x1 + rng.normal(0, 3), b.y1 + rng.normal(0, 3), 0, 0) for b in ref]
        pred = [Box(p.x1, p.y1, max(p.x1, b.x2), max(p.y1, b.y2), score=float(rng.uniform()))
                for p, b in zip(pred, ref, strict=True) if rng.uniform() < 0.8]  # fmt: skip
        preds.append(pred)
        refs.append(ref)
    capsys.readouterr()
    got = coco_average_precision(preds, refs)
    assert capsys.readouterr().out == ""
    stats = cocoeval_stats(preds, refs)
    assert got["ap"] == pytest.approx(stats[0], abs=1e-12)
    assert got["ap50"] == pytest.approx(stats[1], abs=1e-12)
    assert got["ap75"] == pytest.approx(stats[2], abs=1e-12)
    assert not any(np.isnan(v) for v in got.values())


def test_ap_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="1 prediction and 2 reference box lists"):
        coco_average_precision([[Box(0, 0, 1, 1, score=0.5)]], [[], []])
