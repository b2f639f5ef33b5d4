"""Weighted COCO AP (`scoring/weighted_ap.py`) against pycocotools' COCOeval on the same boxes.

Expected values: pycocotools ``COCOeval`` (bbox, ``areaRng`` as pycocotools defines it) on the
same boxes and scores, and on images repeated as often as a bootstrap resample draws them."""

from __future__ import annotations

import numpy as np
import pytest

from vieval_runner.records import Box
from vieval_runner.scoring import intervals
from vieval_runner.scoring.weighted_ap import (
    AREA_RANGES,
    area_range_ap,
    detection_table,
    weighted_ap,
)
from vieval_runner.testing import stat_stores
from vieval_runner.testing.stat_stores import cocoeval_precision


def scored_step(seed: int, n: int = 40):
    """Boxes of COCO's three area ranges (sides about 8, 40 and 130 pixels), scores rounded
    to 0.01 (ties), predictions in written order."""
    sides = lambda rng: rng.choice([8.0, 40.0, 130.0]) * rng.uniform(0.7, 1.3, 2)  # noqa: E731
    return stat_stores.scored_step(seed, n, sizes=sides, jitter=(1.0, 4.0, 15.0),
                                   score_decimals=2, empty=(9, 4), shuffle=False)  # fmt: skip


def assert_area_aps_equal_pycocotools(preds, refs) -> None:
    """``area_range_ap`` at every area range against pycocotools COCOeval's accumulated
    precision on the same boxes (-1 where a range has no reference: our None)."""
    prec = cocoeval_precision(preds, refs)
    for a, area in enumerate(AREA_RANGES):
        p = prec[:, :, a]
        got = area_range_ap(preds, refs, area)
        if (p > -1).sum() == 0:
            assert got is None, area
            continue
        assert got["ap"] == pytest.approx(p[p > -1].mean(), abs=1e-6), area
        assert got["ap50"] == pytest.approx(p[0].mean(), abs=1e-6), area
        assert got["ap75"] == pytest.approx(p[5].mean(), abs=1e-6), area


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_area_range_ap_equals_pycocotools(seed):
    preds, refs = scored_step(seed)
    assert_area_aps_equal_pycocotools(preds, refs)
    assert area_range_ap(preds, refs, "small")["ap"] != pytest.approx(
        area_range_ap(preds, refs, "large")["ap"], abs=1e-3
    )


@pytest.mark.parametrize("area", ["all", "small", "medium", "large"])
@pytest.mark.parametrize("seed", [4, 5])
def test_weighted_ap_equals_pycocotools_on_duplicated_images(seed, area):
    preds, refs = scored_step(seed, 25)
    weights = np.random.default_rng(seed).integers(0, 3, 25)
    # a resample drawn as counts equals COCOeval on the images repeated that many times
    # (scores made unique so that tie order between copies cannot matter)
    preds = [
        [Box(*b.as_list(), score=b.score + 1e-6 * i) for b in bs] for i, bs in enumerate(preds)
    ]
    dup_p = [p for p, w in zip(preds, weights, strict=True) for _ in range(w)]
    dup_r = [r for r, w in zip(refs, weights, strict=True) for _ in range(w)]
    prec = cocoeval_precision(dup_p, dup_r)[:, :, list(AREA_RANGES).index(area)]
    got = weighted_ap(detection_table(preds, refs, AREA_RANGES[area]), weights[None])
    if (prec > -1).sum() == 0:  # no reference in the range: COCOeval's -1, our NaN
        assert np.isnan(got["ap"][0])
        return
    assert got["ap"][0] == pytest.approx(prec[prec > -1].mean(), abs=1e-6)
    assert got["ap50"][0] == pytest.approx(prec[0].mean(), abs=1e-6)
    # rows are independent resamples: the same weights twice give the same AP twice
    twice = weighted_ap(detection_table(preds, refs, AREA_RANGES[area]), np.stack([weights] * 2))
    assert twice["ap"][0] == twice["ap"][1] == got["ap"][0]


def test_ap_interval_brackets_point_estimate():
    preds, refs = scored_step(6, 120)
    point = area_range_ap(preds, refs)
    ci = intervals.ap_intervals(preds, refs, n_resamples=200)
    assert ci["ap"][0] < point["ap"] < ci["ap"][1]
    assert ci["ap50"][0] < point["ap50"] < ci["ap50"][1]


def test_ap_resamples_set_only_the_ap_draws():
    from vieval_runner import scoring

    preds, refs = scored_step(6, 120)
    per = scoring.score_grounding(preds, refs, ["ok"] * 120)
    rows = {k: [d[k] for d in per] for k in per[0]}
    few = intervals.step_intervals("grounding", rows, preds, refs, ap_resamples=50)
    default = intervals.step_intervals("grounding", rows, preds, refs)
    assert default == intervals.step_intervals("grounding", rows, preds, refs, ap_resamples=200)
    assert few["ap"] != default["ap"] and few["ap50"] != default["ap50"]
    assert {k: few[k] for k in ("f1", "precision", "recall", "acc_at_50")} == {
        k: default[k] for k in ("f1", "precision", "recall", "acc_at_50")
    }
    assert few["ap"] == intervals.ap_intervals(preds, refs, n_resamples=50)["ap"]


def crowded_step(seed: int, n: int = 60):
    """Images with 2-6 references, one sometimes repeated (equal IoUs: COCOeval keeps the last
    of equal candidates), and 0-2 detections per reference with tied scores."""
    rng = np.random.default_rng(seed)
    preds, refs = [], []
    for _ in range(n):
        ref = []
        for _ in range(int(rng.integers(2, 7))):
            x, y = rng.integers(0, 60, 2)
            w, h = rng.choice([6, 30, 120], 2)
            ref.append(Box(float(x), float(y), float(x + w), float(y + h)))
        ref += [ref[0]] * int(rng.integers(0, 2))
        pred = [
            Box(
                b.x1 + int(rng.integers(-3, 4)),
                b.y1,
                b.x2,
                b.y2 + int(rng.integers(0, 3)),
                score=float(rng.choice([0.5, 0.7, 0.9])),
            )  # fmt: skip
            for b in ref
            for _ in range(int(rng.integers(0, 3)))
        ]
        preds.append(pred)
        refs.append(ref)
    return preds, refs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crowded_images_equal_pycocotools(seed):
    preds, refs = crowded_step(seed)
    assert_area_aps_equal_pycocotools(preds, refs)


def test_equal_ious_and_ignored_references_match_as_pycocotools():
    # A detection equally close to two references (IoU 0.818 each) takes the later one
    # (COCOeval's scan keeps the last of equal IoUs), which leaves the first for the next
    # detection, its exact copy; had it taken the first, the copy would overlap what is left
    # by 0.667 only, a false positive from IoU 0.7 on. Under "small", a detection overlapping
    # a small and a larger (ignored) reference takes the small one although the other's IoU
    # is higher (0.879 < 0.886).
    tie = ([Box(1, 0, 11, 10, score=0.9), Box(0, 0, 10, 10, score=0.8)],
           [Box(0, 0, 10, 10), Box(2, 0, 12, 10)])  # fmt: skip
    ignored = ([Box(0, 0, 32, 32, score=0.7)], [Box(0, 0, 30, 30), Box(0, 0, 34, 34)])
    preds, refs = crowded_step(7, 20)
    preds, refs = [tie[0], ignored[0], *preds], [tie[1], ignored[1], *refs]
    assert_area_aps_equal_pycocotools(preds, refs)
    alone = cocoeval_precision([tie[0]], [tie[1]])[:, :, 0]
    assert area_range_ap([tie[0]], [tie[1]])["ap"] == pytest.approx(alone.mean(), abs=1e-6)
    assert alone[4] == pytest.approx(np.ones(101))  # at IoU 0.7 both detections are true positives
    small = cocoeval_precision([ignored[0]], [ignored[1]])[:, :, 1]
    assert area_range_ap([ignored[0]], [ignored[1]], "small")["ap"] == pytest.approx(small.mean())
    assert small[0] == pytest.approx(np.ones(101))  # matched to the small one: a true positive
