"""Statistics over specimens: bootstrap intervals, paired comparisons, exact McNemar.

Everything is vectorised numpy over per-specimen arrays. A step metric here is a function of
*sums* of per-specimen columns (micro P/R/F1 of summed tp/fp/fn, a mean as sum / count), so a
bootstrap resample is a matrix product: ``counts [B, n] @ columns [n, k]``, where ``counts``
holds how often each specimen was drawn. The draws are ``rng.integers(0, n, (batch, n))`` with
``numpy.random.default_rng(seed)``, batch by batch, exactly as ``scipy.stats.bootstrap`` draws
them, so with the same seed and batch size the percentile interval equals scipy's
``method="percentile"`` (tested). scipy has no paired bootstrap of a *difference of ratio
statistics* in one call and no resampling by counts, hence this module; the exact McNemar test
is scipy's ``binomtest``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np

DEFAULT_SEED = 0
DEFAULT_RESAMPLES = 2000
DEFAULT_BATCH = 250  # resamples per vectorised batch: bounds memory at B x n counts
CONFIDENCE = 0.95
# scipy.stats.permutation_test's tolerance for "as extreme as observed" (floating-point ties)
_EPS = np.finfo(np.float64).eps * 100

Finish = Callable[[np.ndarray], dict[str, np.ndarray]]


def mean_present(values: list[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def resample_counts(
    n: int, n_resamples: int, seed: int = DEFAULT_SEED, batch: int = DEFAULT_BATCH
) -> Iterator[np.ndarray]:
    """``[b, n]`` float64 draw counts per batch (rows sum to n): scipy's bootstrap draws."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, batch):
        b = min(batch, n_resamples - start)
        idx = rng.integers(0, n, (b, n))
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _grouped(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(distinct rows, how many specimens have each)`` when there are few distinct rows."""
    n = columns.shape[0]
    if n < 64:
        return None
    rows, counts = np.unique(columns, axis=0, return_counts=True)
    # a multinomial costs ~5x an index draw per category: worth it below n / 5 distinct rows
    return (rows, counts.astype(np.float64)) if len(rows) <= max(32, n // 8) else None


def resample_sums(
    columns: np.ndarray,
    n_resamples: int,
    seed: int = DEFAULT_SEED,
    batch: int = DEFAULT_BATCH,
    method: str = "auto",
) -> Iterator[np.ndarray]:
    """``[b, k]`` column sums of bootstrap resamples of the rows of ``columns [n, k]``.

    ``method="draws"`` draws specimen indices as scipy does. ``"auto"`` does the same unless
    the rows take few distinct values (integer counts such as tp/fp/fn, 0/1 outcomes): then a
    resample is one multinomial draw of how many copies of each distinct row it holds, which
    is the same resampling distribution at a cost independent of n.
    """
    grouped = _grouped(columns) if method == "auto" else None
    if grouped is None:
        for counts in resample_counts(columns.shape[0], n_resamples, seed, batch):
            yield counts @ columns
        return
    rows, counts = grouped
    rng = np.random.default_rng(seed)
    n = int(counts.sum())
    for start in range(0, n_resamples, batch):
        b = min(batch, n_resamples - start)
        yield rng.multinomial(n, counts / n, size=b).astype(np.float64) @ rows


def percentile_interval(theta: np.ndarray, confidence: float = CONFIDENCE) -> list[float | None]:
    """``[low, high]`` percentile interval of a bootstrap distribution (NaN draws ignored)."""
    theta = np.asarray(theta, dtype=np.float64)
    if not np.isfinite(theta).any():
        return [None, None]
    alpha = (1 - confidence) / 2
    low, high = np.nanpercentile(theta, [alpha * 100, (1 - alpha) * 100])
    return [float(low), float(high)]


def bootstrap_sums(
    columns: np.ndarray,
    finish: Finish,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    batch: int = DEFAULT_BATCH,
    confidence: float = CONFIDENCE,
    method: str = "auto",
) -> dict[str, list[float | None]]:
    """Percentile intervals of ``finish(column sums)`` over specimen-level bootstrap resamples.

    ``columns`` is ``[n, k]`` (one row per specimen); ``finish`` maps ``[B, k]`` sums to named
    ``[B]`` metric values. An empty step has no interval (``[None, None]`` each).
    """
    columns = np.asarray(columns, dtype=np.float64)
    n = columns.shape[0]
    if n == 0:
        return {name: [None, None] for name in finish(np.zeros((1, columns.shape[1])))}
    draws: dict[str, list[np.ndarray]] = {}
    for sums in resample_sums(columns, n_resamples, seed, batch, method):
        for name, values in finish(sums).items():
            draws.setdefault(name, []).append(values)
    return {k: percentile_interval(np.concatenate(v), confidence) for k, v in draws.items()}


def paired_difference(
    columns_a: np.ndarray,
    columns_b: np.ndarray,
    finish: Callable[[np.ndarray], np.ndarray],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    batch: int = DEFAULT_BATCH,
    confidence: float = CONFIDENCE,
    method: str = "auto",
) -> dict:
    """B minus A on the same specimens: the difference, its paired-bootstrap interval, and a
    two-sided paired permutation p-value (each specimen's A and B swapped with probability 1/2;
    all ``2**n`` swaps when that is no more than ``n_resamples``), scipy's
    ``permutation_test(permutation_type="samples")`` definition.

    ``finish`` maps ``[B, k]`` column sums to ``[B]`` metric values.
    """
    a = np.asarray(columns_a, dtype=np.float64)
    b = np.asarray(columns_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: shapes {a.shape} and {b.shape} differ")
    n = a.shape[0]
    if n == 0:
        return {"difference": None, "ci95": [None, None], "p_value": None}
    observed = float(finish(b.sum(0)[None])[0] - finish(a.sum(0)[None])[0])
    k = a.shape[1]
    diffs = [
        finish(sums[:, k:]) - finish(sums[:, :k])
        for sums in resample_sums(np.concatenate([a, b], axis=1), n_resamples, seed, batch, method)
    ]
    ci = percentile_interval(np.concatenate(diffs), confidence)
    return {
        "difference": observed,
        "ci95": ci,
        "p_value": _permutation_p(a, b, finish, observed, n_resamples, seed, batch),
    }


def _moves(delta: np.ndarray, n_resamples: int, seed: int, batch: int) -> tuple[Iterator, bool]:
    """Per batch ``[b, k]``: the sum of ``delta`` over the swapped specimens, and whether the
    swaps are all ``2**n`` (exact). Few distinct rows: a binomial count per distinct row."""
    n = delta.shape[0]
    if n < 63 and 2**n <= n_resamples:
        every = np.array(list(itertools.product((0.0, 1.0), repeat=n)))
        return iter([every @ delta]), True
    rng = np.random.default_rng(seed + 1)  # independent of the bootstrap draws
    grouped = _grouped(delta)

    def moves() -> Iterator[np.ndarray]:
        for start in range(0, n_resamples, batch):
            b = min(batch, n_resamples - start)
            if grouped is None:
                yield (rng.random((b, n)) < 0.5).astype(np.float64) @ delta
            else:
                rows, counts = grouped
                yield rng.binomial(counts.astype(np.int64), 0.5, size=(b, len(rows))) @ rows

    return moves(), False


def _permutation_p(a, b, finish, observed: float, n_resamples: int, seed: int, batch: int):
    sum_a, sum_b = a.sum(0), b.sum(0)
    # swapping specimen i moves its (b - a) from B's sums to A's
    moves, exact = _moves(b - a, n_resamples, seed, batch)
    null = []
    for moved in moves:
        null.append(finish(sum_b - moved) - finish(sum_a + moved))
    dist = np.concatenate(null)
    dist = dist[np.isfinite(dist)]
    if not len(dist) or not np.isfinite(observed):
        return None
    gamma = abs(_EPS * observed)
    adjust = 0 if exact else 1
    less = (np.sum(dist <= observed + gamma) + adjust) / (len(dist) + adjust)
    greater = (np.sum(dist >= observed - gamma) + adjust) / (len(dist) + adjust)
    return float(min(1.0, 2 * min(less, greater)))


def mcnemar_exact(outcome_a: np.ndarray, outcome_b: np.ndarray) -> dict:
    """Exact McNemar test of paired binary outcomes (1 = success) on the same specimens.

    ``better`` = specimens wrong under A and right under B, ``worse`` the reverse; the p-value
    is the two-sided exact binomial test of ``better`` of ``better + worse`` at 1/2
    (``scipy.stats.binomtest``, as statsmodels' ``mcnemar(exact=True)``), 1 without any
    discordant pair.
    """
    from scipy.stats import binomtest

    a = np.asarray(outcome_a, dtype=bool)
    b = np.asarray(outcome_b, dtype=bool)
    better, worse = int(np.sum(~a & b)), int(np.sum(a & ~b))
    p = 1.0 if better + worse == 0 else float(binomtest(better, better + worse, 0.5).pvalue)
    return {
        "better": better,
        "worse": worse,
        "unchanged": int(len(a) - better - worse),
        "p_value": p,
    }


def change_counts(
    values_a: np.ndarray, values_b: np.ndarray, lower_is_better: bool = False
) -> dict:
    """How many specimens got better, worse, or stayed the same (within 1e-12) from A to B."""
    d = np.asarray(values_b, dtype=np.float64) - np.asarray(values_a, dtype=np.float64)
    if lower_is_better:
        d = -d
    better, worse = int(np.sum(d > 1e-12)), int(np.sum(d < -1e-12))
    return {"better": better, "worse": worse, "unchanged": int(len(d) - better - worse)}
