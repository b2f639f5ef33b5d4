"""Benchmark the store reader against a naive per-click query.

Builds a synthetic store (default 10,000 specimens x 50 steps, written with ``commit_step``
as the runner does), then times ``StoreReader.specimen_history`` (cold and warm) and
``StoreReader.step`` against the naive way a viewer would do it: one query per click
(``polars.scan_delta`` filter, and delta-rs ``QueryBuilder``). The LAST line printed is the
ratio naive-per-click time / our warm per-click time for ``specimen_history``.

    .venv/bin/python scripts/bench_store.py [--specimens N] [--steps S] [--out DIR]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable

from vieval_runner.store import commit_step, create_store, open_store, table_uri


def _rows(n: int, step: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        x, y = rng.uniform(0, 500), rng.uniform(0, 400)
        tp = rng.randint(0, 2)
        rows.append(
            {
                "specimen_id": f"img_{i:06d}.jpg",
                "raw_text": f'[{{"bbox_2d": [{x:.0f}, {y:.0f}, {x + 40:.0f}, {y + 30:.0f}], '
                f'"label": "object {i % 80}"}}] step {step}',
                "pred_boxes": [
                    {"x1": x, "y1": y, "x2": x + 40, "y2": y + 30, "label": f"object {i % 80}"}
                ],
                "parse_status": "ok",
                "tp": tp,
                "fp": 1 - min(tp, 1),
                "fn": 2 - tp,
                "precision": float(tp > 0),
                "recall": tp / 2,
                "f1": rng.random(),
                "iou_mean": rng.random(),
                "failure_category": rng.choice(["good", "loose", "missed", "false_positive"]),
                "input_width": 448,
                "input_height": 448,
            }
        )
    return rows


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specimens", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--clicks", type=int, default=5, help="naive per-click queries to time")
    ap.add_argument("--out", default=None, help="store folder (default: a temp folder)")
    args = ap.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="vieval-bench-") + "/store"
    rng = random.Random(0)
    run = "bench-run"

    t0 = time.perf_counter()
    create_store(root)
    for k in range(args.steps):
        step = (k + 1) * 100
        commit_step(
            root,
            {"run_id": run, "step": step, "f1": rng.random()},
            _rows(args.specimens, step, rng),
        )
    write_s = time.perf_counter() - t0
    print(f"store: {root}  {args.specimens} specimens x {args.steps} steps")
    print(f"write: {write_s:.1f} s total, {1000 * write_s / args.steps:.0f} ms per step commit")

    ids = [f"img_{rng.randrange(args.specimens):06d}.jpg" for _ in range(200)]
    mid = (args.steps // 2 + 1) * 100

    reader = open_store(root)
    t0 = time.perf_counter()
    hist = reader.specimen_history(run, ids[0])
    cold = time.perf_counter() - t0
    assert hist.num_rows == args.steps, hist.num_rows
    it = iter(ids * 10)
    warm = _time(lambda: reader.specimen_history(run, next(it)), 200)
    print(
        f"ours specimen_history: cold {1000 * cold:.0f} ms (loads + indexes the run), "
        f"warm {1e6 * warm:.0f} us per click"
    )

    fresh = open_store(root)
    step_cold = _time(lambda: open_store(root).step(run, mid), 3)
    fresh.step(run, mid)
    step_warm = _time(lambda: fresh.step(run, mid), 50)
    print(f"ours step(): cold {1000 * step_cold:.0f} ms, warm {1e6 * step_warm:.1f} us")

    from deltalake import DeltaTable, QueryBuilder

    uri = table_uri(root, "predictions")
    it2 = iter(ids)

    def qb_click() -> None:
        sid = next(it2)
        sql = f"SELECT * FROM p WHERE run_id = '{run}' AND specimen_id = '{sid}' ORDER BY step"
        table = QueryBuilder().register("p", DeltaTable(uri)).execute(sql).read_all()
        assert len(table) == args.steps

    qb_s = _time(qb_click, args.clicks)
    print(f"naive QueryBuilder per click: {1000 * qb_s:.0f} ms")
    qb_step = _time(
        lambda: (
            QueryBuilder()
            .register("p", DeltaTable(uri))
            .execute(f"SELECT * FROM p WHERE run_id = '{run}' AND step = {mid}")
            .read_all()
        ),
        3,
    )
    print(f"naive QueryBuilder step query: {1000 * qb_step:.0f} ms")
    baseline = qb_s
    try:
        import polars as pl

        it3 = iter(ids[50:])

        def pl_click() -> None:
            sid = next(it3)
            out = (
                pl.scan_delta(uri)
                .filter((pl.col("run_id") == run) & (pl.col("specimen_id") == sid))
                .collect()
            )
            assert out.height == args.steps

        pl_s = _time(pl_click, args.clicks)
        print(f"naive polars.scan_delta per click: {1000 * pl_s:.0f} ms")
        baseline = min(baseline, pl_s)
    except ImportError:
        print("polars not installed: QueryBuilder is the baseline")
    print(f"amortised over 100 clicks: ours {1000 * (cold + 99 * warm) / 100:.1f} ms per click")
    print(f"ratio (fastest naive per-click / ours warm per-click): {baseline / warm:.0f}")


if __name__ == "__main__":
    main()
