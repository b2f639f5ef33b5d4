"""Bootstrap intervals of one 10,000-specimen grounding step: vectorised vs a naive loop.

Ours: `scoring.intervals.step_intervals` (micro F1/P/R, acc@0.5; 2,000 resamples
as counts @ columns) plus AP50/AP (200 weighted resamples), then AP50/AP of a COCO-like step
(1-20 references per image, `bench_scoring.grounding_step`). Naive: the textbook loop, one
resample at a time, recomputing the metrics from the per-specimen dicts in Python. The naive
loop runs fewer resamples and is scaled to the same count. Last line: the ratio.

    python scripts/bench_stats.py [--n 10000] [--resamples 2000] [--naive-resamples 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bench_scoring import grounding_step  # 1-20 references per image, as COCO

from vieval_runner.records import Box
from vieval_runner.scoring import intervals


def synthetic_step(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("tp", "fp", "fn", "acc_at_50", "iou_mean")}
    preds, refs = [], []
    for _ in range(n):
        x, y = rng.uniform(0, 500, 2)
        w, h = rng.uniform(10, 200, 2)
        ref = Box(x, y, x + w, y + h)
        jitter = rng.normal(0, rng.choice([2.0, 20.0]), 4)
        pred = [Box(*(np.array(ref.as_list()) + jitter), score=float(rng.uniform()))]
        if rng.uniform() < 0.3:
            pred.append(Box(x + 50, y + 50, x + w + 50, y + h + 50, score=float(rng.uniform())))
        hit = bool(np.abs(jitter).max() < 8)
        rows["tp"].append(int(hit))
        rows["fp"].append(len(pred) - int(hit))
        rows["fn"].append(1 - int(hit))
        rows["acc_at_50"].append(float(hit))
        rows["iou_mean"].append(float(rng.uniform(0.5, 1)) if hit else None)
        preds.append(pred)
        refs.append([ref])
    return rows, preds, refs


def naive(rows: dict, n_resamples: int, seed: int = 0) -> dict:
    """One resample at a time, metrics recomputed from per-specimen values in Python."""
    rng = np.random.default_rng(seed)
    n = len(rows["tp"])
    per = [{k: rows[k][i] for k in rows} for i in range(n)]
    f1s, accs = [], []
    for _ in range(n_resamples):
        draw = [per[i] for i in rng.integers(0, n, n)]
        tp = sum(d["tp"] for d in draw)
        fp = sum(d["fp"] for d in draw)
        fn = sum(d["fn"] for d in draw)
        f1s.append(2 * tp / (2 * tp + fp + fn))
        acc = [d["acc_at_50"] for d in draw if d["acc_at_50"] is not None]
        accs.append(sum(acc) / len(acc))
    return {"f1": np.percentile(f1s, [2.5, 97.5]), "acc_at_50": np.percentile(accs, [2.5, 97.5])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--naive-resamples", type=int, default=50)
    args = parser.parse_args()
    rows, preds, refs = synthetic_step(args.n)
    t0 = time.perf_counter()
    counts_only = intervals.step_intervals("grounding", rows, n_resamples=args.resamples)
    t1 = time.perf_counter()
    with_ap = intervals.step_intervals("grounding", rows, preds, refs, n_resamples=args.resamples)
    t2 = time.perf_counter()
    naive(rows, args.naive_resamples)
    t3 = time.perf_counter()
    ours = t1 - t0
    naive_scaled = (t3 - t2) * args.resamples / args.naive_resamples
    print(f"step: {args.n} specimens, {args.resamples} resamples (AP: {intervals.AP_RESAMPLES})")
    print(f"ours F1/P/R/acc@0.5 intervals: {ours * 1000:.0f} ms  f1 {counts_only['f1']}")
    print(f"ours with AP50/AP intervals too: {(t2 - t1) * 1000:.0f} ms  ap {with_ap['ap']}")
    print(f"naive loop: {(t3 - t2) * 1000:.0f} ms for {args.naive_resamples} resamples, "
          f"{naive_scaled:.1f} s scaled to {args.resamples}")  # fmt: skip
    crowded_p, crowded_r = grounding_step(args.n, seed=1, scored=True)
    t4 = time.perf_counter()
    crowded = intervals.ap_intervals(crowded_p, crowded_r)
    t5 = time.perf_counter()
    print(f"AP50/AP intervals of a COCO-like step ({args.n} specimens, "
          f"{sum(map(len, crowded_r))} references, {sum(map(len, crowded_p))} scored "
          f"detections): {(t5 - t4) * 1000:.0f} ms  ap {crowded['ap']}")  # fmt: skip
    print(f"ratio (naive / ours, F1/P/R/acc@0.5 intervals): {naive_scaled / ours:.0f}")


if __name__ == "__main__":
    main()
