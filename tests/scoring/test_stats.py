"""Bootstrap intervals and paired tests against scipy / statsmodels-style references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from vieval_runner.scoring import intervals, stats


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


def test_grouped_resampling_with_many_distinct_rows_matches_scipy():
    # 225 distinct (tp, fp, fn) rows among 2,000 specimens: still one multinomial per
    # resample (below n / 8 distinct rows), the same distribution as scipy's index draws
    rng = np.random.default_rng(5)
    tp, fp, fn = (rng.integers(0, k, 2000).astype(float) for k in (9, 5, 5))
    cols = np.stack([tp, fp, fn, np.zeros(2000), np.zeros(2000)], axis=1)
    assert len(np.unique(cols, axis=0)) == 225
    got = stats.bootstrap_sums(cols, intervals.finish_grounding, n_resamples=20000)
    ref = sps.bootstrap((tp, fp, fn), _f1, paired=True, vectorized=True, n_resamples=20000,
                        method="percentile", rng=np.random.default_rng(2))  # fmt: skip
    ci = [ref.confidence_interval.low, ref.confidence_interval.high]
    assert got["f1"] == pytest.approx(ci, abs=1.5e-3)
    assert ci[1] - ci[0] > 0.015


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
