"""Bootstrap intervals, paired tests and weighted AP against scipy / pycocotools references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from vieval_runner.records import Box
from vieval_runner.scoring import intervals, stats
from vieval_runner.scoring.weighted_ap import (
    AREA_RANGES,
    area_range_ap,
    detection_table,
    weighted_ap,
)
from vieval_runner.testing.stat_stores import cocoeval_precision


def _counts(seed: int, n: int):
    rng = np.random.default_rng(seed)
    tp = rng.integers(0, 3, n).astype(float)
    fp = rng.integers(0, 2, n).astype(float)
    fn = rng.integers(0, 2, n).astype(float)
    return tp, fp, fn


def _f1(tp, fp, fn, axis=-1):
    t, p, n = tp.sum(axis), fp.sum(axis), fn.sum(axis)
    return 2 * t / (2 * t + p + n)


@pytest.mark.parametrize("n", [40, 301])
def test_micro_f1_interval_equals_scipy_bootstrap(n):
    tp, fp, fn = _counts(n, n)
    cols = np.stack([tp, fp, fn, np.zeros(n), np.zeros(n)], axis=1)
    got = stats.bootstrap_sums(cols, intervals.finish_grounding, n_resamples=999, seed=7,
                               batch=100, method="draws")  # fmt: skip
    # reference: scipy's paired percentile bootstrap with the same generator and batch size
    ref = sps.bootstrap((tp, fp, fn), _f1, paired=True, vectorized=True, n_resamples=999,
                        batch=100, method="percentile", rng=np.random.default_rng(7))  # fmt: skip
    ci = [ref.confidence_interval.low, ref.confidence_interval.high]
    assert got["f1"] == pytest.approx(ci, abs=1e-12)


def test_grouped_resampling_matches_scipy_distribution():
    # integer counts take few distinct rows: "auto" draws a multinomial over them instead of
    # n indices; the same resampling distribution, so the intervals agree up to Monte Carlo
    # error (~7e-4 here with 20,000 resamples each)
    tp, fp, fn = _counts(0, 2000)
    cols = np.stack([tp, fp, fn, np.zeros(2000), np.zeros(2000)], axis=1)
    got = stats.bootstrap_sums(cols, intervals.finish_grounding, n_resamples=20000)
    ref = sps.bootstrap((tp, fp, fn), _f1, paired=True, vectorized=True, n_resamples=20000,
                        method="percentile", rng=np.random.default_rng(1))  # fmt: skip
    ci = [ref.confidence_interval.low, ref.confidence_interval.high]
    assert got["f1"] == pytest.approx(ci, abs=3e-3)
    assert ci[1] - ci[0] > 0.02  # wide enough for the tolerance to mean something


def test_mean_interval_equals_scipy_bootstrap():
    rng = np.random.default_rng(3)
    em = (rng.uniform(size=250) < 0.6).astype(float)
    rows = {name: list(em) for name in intervals.VQA_INTERVAL_METRICS}
    got = intervals.step_intervals("vqa", rows, n_resamples=500, seed=11, method="draws")
    ref = sps.bootstrap((em,), np.mean, n_resamples=500, batch=stats.DEFAULT_BATCH,
                        method="percentile", rng=np.random.default_rng(11))  # fmt: skip
    ci = ref.confidence_interval
    assert got["exact_match"] == pytest.approx([ci.low, ci.high], abs=1e-12)


def test_paired_difference_interval_equals_scipy_bootstrap():
    rng = np.random.default_rng(5)
    a = rng.uniform(size=120)
    b = a + rng.normal(0.05, 0.1, 120)
    got = stats.paired_difference(
        np.stack([a, np.ones(120)], 1), np.stack([b, np.ones(120)], 1),
        lambda s: s[:, 0] / s[:, 1], n_resamples=600, seed=2, batch=200, method="draws",
    )  # fmt: skip
    ref = sps.bootstrap((a, b), lambda x, y, axis=-1: y.mean(axis) - x.mean(axis), paired=True,
                        vectorized=True, n_resamples=600, batch=200, method="percentile",
                        rng=np.random.default_rng(2))  # fmt: skip
    assert got["difference"] == pytest.approx(b.mean() - a.mean(), abs=1e-12)
    ci = ref.confidence_interval
    assert got["ci95"] == pytest.approx([ci.low, ci.high], abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_permutation_p_exact_for_tiny_n_equals_scipy(n):
    rng = np.random.default_rng(n)
    a, b = rng.uniform(size=n), rng.uniform(size=n)
    b[0] = a[0]  # a tie: swapping it changes nothing
    got = stats.paired_difference(
        np.stack([a, np.ones(n)], 1), np.stack([b, np.ones(n)], 1),
        lambda s: s[:, 0] / s[:, 1], n_resamples=1000,
    )  # fmt: skip
    # reference: scipy enumerates all 2**n swaps exactly when 2**n <= n_resamples
    ref = sps.permutation_test(
        (a, b),
        lambda x, y, axis=-1: y.mean(axis) - x.mean(axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=1000,
    )
    assert got["p_value"] == pytest.approx(ref.pvalue, abs=1e-12)


def test_one_specimen_cannot_be_significant():
    # all 2 swaps: the null is {d, -d}, so p = min(1, 2 * 1/2) = 1 (scipy refuses n = 1)
    got = stats.paired_difference(np.array([[0.2, 1.0]]), np.array([[0.9, 1.0]]),
                                  lambda s: s[:, 0] / s[:, 1])  # fmt: skip
    assert got["difference"] == pytest.approx(0.7) and got["p_value"] == 1.0


def test_permutation_p_sampled_agrees_with_scipy():
    rng = np.random.default_rng(9)
    a = rng.uniform(size=60)
    b = a + rng.normal(0.03, 0.1, 60)
    got = stats.paired_difference(np.stack([a, np.ones(60)], 1), np.stack([b, np.ones(60)], 1),
                                  lambda s: s[:, 0] / s[:, 1], n_resamples=20000)  # fmt: skip
    ref = sps.permutation_test((a, b), lambda x, y, axis=-1: y.mean(axis) - x.mean(axis),
                               permutation_type="samples", vectorized=True, n_resamples=20000,
                               rng=np.random.default_rng(1))  # fmt: skip
    assert 0.001 < ref.pvalue < 0.999
    assert got["p_value"] == pytest.approx(ref.pvalue, abs=0.02)  # two Monte Carlo estimates


def test_grouped_permutation_p_agrees_with_scipy():
    rng = np.random.default_rng(4)
    a = (rng.uniform(size=400) < 0.5).astype(float)
    b = np.where(rng.uniform(size=400) < 0.1, 1 - a, a)
    b[:6] = 1.0
    cols_a, cols_b = np.stack([a, np.ones(400)], 1), np.stack([b, np.ones(400)], 1)
    got = stats.paired_difference(cols_a, cols_b, lambda s: s[:, 0] / s[:, 1], n_resamples=20000)
    ref = sps.permutation_test((a, b), lambda x, y, axis=-1: y.mean(axis) - x.mean(axis),
                               permutation_type="samples", vectorized=True, n_resamples=20000,
                               rng=np.random.default_rng(1))  # fmt: skip
    assert 0.001 < ref.pvalue < 0.999
    assert got["p_value"] == pytest.approx(ref.pvalue, abs=0.02)


def test_all_equal_steps_give_p_one():
    tp, fp, fn = _counts(1, 50)
    cols = np.stack([tp, fp, fn, np.zeros(50), np.zeros(50)], 1)
    got = stats.paired_difference(cols, cols, lambda s: intervals.finish_grounding(s)["f1"])
    assert got["difference"] == 0.0 and got["p_value"] == 1.0 and got["ci95"] == [0.0, 0.0]
    assert stats.mcnemar_exact(np.ones(5), np.ones(5))["p_value"] == 1.0


@pytest.mark.parametrize(
    "better,worse,same", [(0, 0, 4), (1, 0, 0), (7, 2, 30), (3, 3, 1), (25, 10, 5)]
)
def test_mcnemar_exact_equals_binomial_reference(better, worse, same):
    a = np.array([0] * better + [1] * worse + [1] * same, dtype=bool)
    b = np.array([1] * better + [0] * worse + [1] * same, dtype=bool)
    got = stats.mcnemar_exact(a, b)
    assert (got["better"], got["worse"], got["unchanged"]) == (better, worse, same)
    n = better + worse
    # statsmodels' mcnemar(exact=True): min(1, 2 * Binom(n, 1/2).cdf(min(b, c))), p = 1 if n = 0
    expected = 1.0 if n == 0 else min(1.0, 2 * sps.binom.cdf(min(better, worse), n, 0.5))
    assert got["p_value"] == pytest.approx(expected, abs=1e-12)
    if n:
        assert got["p_value"] == pytest.approx(sps.binomtest(better, n, 0.5).pvalue, abs=1e-12)


def test_compare_steps_binary_uses_mcnemar_and_counts():
    a = {"acc_at_50": [1, 0, 0, 1, None, 0], "tp": [1] * 6, "fp": [0] * 6, "fn": [0] * 6,
         "iou_mean": [0.9] * 6}  # fmt: skip
    b = dict(a, acc_at_50=[1, 1, 1, 0, 1, 0])
    got = intervals.compare_steps("grounding", "acc_at_50", a, b, n_resamples=200)
    assert (got["n"], got["better"], got["worse"], got["unchanged"]) == (5, 2, 1, 2)
    assert got["difference"] == pytest.approx(3 / 5 - 2 / 5)
    assert got["p_value"] == pytest.approx(sps.binomtest(2, 3, 0.5).pvalue)
    assert got["test"].startswith("exact McNemar")


# ---- weighted AP against pycocotools ---------------------------------------------------------


def scored_step(seed: int, n: int = 40):
    rng = np.random.default_rng(seed)
    preds, refs = [], []
    for i in range(n):
        ref = []
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.choice([8.0, 40.0, 130.0]) * rng.uniform(0.7, 1.3, 2)
            ref.append(Box(x, y, x + w, y + h))
        pred = []
        for b in ref:
            if rng.uniform() < 0.8:
                j = rng.normal(0, rng.choice([1.0, 4.0, 15.0]), 4)
                x1, y1, x2, y2 = np.array(b.as_list()) + j
                pred.append(Box(min(x1, x2), min(y1, y2), max(x1, x2) + 1, max(y1, y2) + 1))
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.choice([8.0, 40.0, 130.0]) * rng.uniform(0.7, 1.3, 2)
            pred.append(Box(x, y, x + w, y + h))
        pred = [Box(*b.as_list(), score=round(float(rng.uniform()), 2)) for b in pred]
        preds.append(pred if i % 9 != 4 else [])
        refs.append(ref)
    return preds, refs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_area_range_ap_equals_pycocotools(seed):
    preds, refs = scored_step(seed)
    prec = cocoeval_precision(preds, refs)
    for a, area in enumerate(("all", "small", "medium", "large")):
        p = prec[:, :, a]
        got = area_range_ap(preds, refs, area)
        if (p > -1).sum() == 0:
            assert got is None
            continue
        assert got["ap"] == pytest.approx(p[p > -1].mean(), abs=1e-6), area
        assert got["ap50"] == pytest.approx(p[0].mean(), abs=1e-6), area
    assert area_range_ap(preds, refs, "small")["ap"] != pytest.approx(
        area_range_ap(preds, refs, "large")["ap"], abs=1e-3
    )


def test_weighted_ap_equals_pycocotools_on_duplicated_images():
    preds, refs = scored_step(4, 25)
    weights = np.random.default_rng(0).integers(0, 3, 25)
    # a resample drawn as counts equals COCOeval on the images repeated that many times
    # (scores made unique so that tie order between copies cannot matter)
    preds = [
        [Box(*b.as_list(), score=b.score + 1e-6 * i) for b in bs] for i, bs in enumerate(preds)
    ]
    dup_p = [p for p, w in zip(preds, weights, strict=True) for _ in range(w)]
    dup_r = [r for r, w in zip(refs, weights, strict=True) for _ in range(w)]
    prec = cocoeval_precision(dup_p, dup_r)[:, :, 0]
    got = weighted_ap(detection_table(preds, refs, AREA_RANGES["all"]), weights[None])
    assert got["ap"][0] == pytest.approx(prec.mean(), abs=1e-6)


def test_ap_interval_brackets_point_estimate():
    preds, refs = scored_step(6, 120)
    point = area_range_ap(preds, refs)
    ci = intervals.ap_intervals(preds, refs, n_resamples=200)
    assert ci["ap"][0] < point["ap"] < ci["ap"][1]
    assert ci["ap50"][0] < point["ap50"] < ci["ap50"][1]
