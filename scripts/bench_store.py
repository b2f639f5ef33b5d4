"""Benchmark the store reader against a naive per-click query.

Builds a synthetic store (default 10,000 specimens x 50 steps, written with ``commit_step``
as the runner does; cached under ``--out`` so reruns reuse it), then times ``StoreReader.specimen_history`` (cold and warm) and
``StoreReader.step`` against the naive way a viewer would do it: one query per click
(``polars.scan_delta`` filter, and delta-rs ``QueryBuilder``). The LAST line printed is the
ratio naive-per-click time / our warm per-click time for ``specimen_history``.

    .venv/bin/python scripts/bench_store.py [--specimens N] [--steps S] [--out DIR]

``build_store`` is reused by ``scripts/bench_viewer.py`` (which adds a specimens table).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout too

from vieval_runner.records import Box, Specimen  # noqa: E402
from vieval_runner.store import (  # noqa: E402
    commit_step,
    create_store,
    open_store,
    table_uri,
    write_specimens,
)

RUN = "bench-run"
WIDTH, HEIGHT = 640, 480  # the synthetic "original" image size; boxes are in these pixels


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


def _specimens(n: int, rng: random.Random) -> list[Specimen]:
    """``n`` grounding specimens with a 64x48 noise JPEG each (small, so writing stays fast)."""
    from PIL import Image

    jpegs = []
    for _ in range(32):  # a few distinct images, cycled: encoding 10,000 would dominate
        img = Image.frombytes("RGB", (64, 48), rng.randbytes(64 * 48 * 3))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        jpegs.append(buf.getvalue())
    out = []
    for i in range(n):
        x, y = rng.uniform(0, 500), rng.uniform(0, 400)
        out.append(
            Specimen(
                specimen_id=f"img_{i:06d}.jpg",
                task="grounding",
                prompt=f"object {i % 80}",
                width=WIDTH,
                height=HEIGHT,
                image_bytes=jpegs[i % len(jpegs)],
                ref_boxes=[Box(x, y, x + 50, y + 40, f"object {i % 80}")],
            )
        )
    return out


def build_store(
    out: str | Path, specimens: int, steps: int, with_specimens: bool = False
) -> tuple[Path, float, bool]:
    """Build (or reuse) a synthetic store of ``specimens`` x ``steps`` under folder ``out``.

    Run ``RUN``, steps 100, 200, ...; with ``with_specimens`` also a specimens table with
    thumbnails and one reference box each. A store is reused only if its build finished (a
    marker file is written last); a half-built one is removed and rebuilt. Returns (store
    root, seconds the build took, whether it was reused).
    """
    name = f"store-{specimens}x{steps}" + ("-specimens" if with_specimens else "")
    root = Path(out) / name
    marker = Path(out) / f"{name}.done.json"
    if marker.exists() and root.exists():
        return root, float(json.loads(marker.read_text())["build_s"]), True
    if root.exists():
        shutil.rmtree(root)  # an interrupted build: never benchmark a partial store
    root.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    t0 = time.perf_counter()
    create_store(str(root))
    if with_specimens:
        write_specimens(str(root), _specimens(specimens, random.Random(1)), "bench")
    for k in range(steps):
        step = (k + 1) * 100
        commit_step(
            str(root),
            {"run_id": RUN, "step": step, "task": "grounding", "f1": rng.random()},
            _rows(specimens, step, rng),
        )
    build_s = time.perf_counter() - t0
    marker.write_text(json.dumps({"specimens": specimens, "steps": steps, "build_s": build_s}))
    return root, build_s, False


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
    ap.add_argument(
        "--out",
        default=str(Path(tempfile.gettempdir()) / "vieval-bench"),
        help="folder caching the built store (reused by later runs)",
    )
    args = ap.parse_args()
    root, write_s, reused = build_store(args.out, args.specimens, args.steps)
    root = str(root)
    rng = random.Random(1)
    run = RUN
    print(f"store: {root}  {args.specimens} specimens x {args.steps} steps")
    print(
        f"write: {write_s:.1f} s total, {1000 * write_s / args.steps:.0f} ms per step commit"
        + ("  (cached store reused; build time from its first run)" if reused else "")
    )

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
