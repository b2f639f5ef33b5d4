"""Benchmark scoring, rescoring and the store reads rescoring needs, at users' split sizes.

Three figures, each beside the naive per-specimen loop measured in the same run:

1. a grounding step (default 100,000 specimens, 1-20 reference boxes each, mostly few):
   ``score_grounding`` + ``aggregate_grounding`` (batched IoU launches) against calling them
   once per specimen; and COCO AP with box scores (faster-coco-eval) against pycocotools'
   ``COCOeval`` on the same boxes;
2. a DocVQA-like ANLS step (default 100,000 answers, 1-3 references, 1 to ~200 characters):
   ANLS through rapidfuzz against the Python double loop it replaced;
3. ``vieval rescore`` over a real Delta store of 50 stored grounding steps: total time split
   into store reads, parsing, metric code (scoring, intervals and the coordinate-frame
   check), rows to Arrow (prediction rows and their conversion for the commit) and the Delta
   commits themselves; scoring set beside the per-specimen loop. Twice: every output new at
   every step, then a converging run where 76 % of the outputs repeat the step before (as in
   the demo store), whose repeats rescore does not parse again.

Naive loops are timed on the first ``--naive-sample`` specimens and scaled linearly to the
full size (per-specimen work is linear; the scale factor is printed). The LAST line is the
ratio naive / project for the 100,000-specimen grounding step.

    .venv/bin/python scripts/bench_scoring.py [--specimens N] [--answers N] [--steps S]
        [--rescore-specimens N] [--naive-sample N] [--torch-threads T] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout too

import numpy as np  # noqa: E402

from vieval_runner.records import Box, Prediction, Specimen  # noqa: E402
from vieval_runner.scoring import (  # noqa: E402
    aggregate_grounding,
    anls_single,
    coco_average_precision,
    score_grounding,
    step_intervals,
)
from vieval_runner.scoring.intervals import ap_intervals  # noqa: E402

WIDTH, HEIGHT = 640, 480


def grounding_step(n: int, seed: int = 0, scored: bool = False):
    """``n`` specimens: 1-20 reference boxes (geometric, mean ~3), predictions jittered from
    80 % of them plus 0-2 stray boxes; corners ordered as every parser returns them."""
    rng = np.random.default_rng(seed)
    preds, refs = [], []
    for _ in range(n):
        k = min(20, int(rng.geometric(0.35)))
        xy, wh = rng.uniform(0, 440, (k, 2)).tolist(), rng.uniform(5, 200, (k, 2)).tolist()
        ref = [Box(x, y, x + w, y + h) for (x, y), (w, h) in zip(xy, wh, strict=True)]
        pred = []
        for b in ref:
            if rng.uniform() < 0.8:
                j = rng.normal(0, 8, 4).tolist()
                x1, y1 = min(b.x1 + j[0], b.x2), min(b.y1 + j[1], b.y2)
                pred.append(Box(x1, y1, b.x2 + abs(j[2]), b.y2 + abs(j[3])))
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 500, 2).tolist()
            pred.append(Box(x, y, x + 60, y + 40))
        if scored:
            pred = [Box(*b.as_list(), score=float(rng.uniform())) for b in pred]
        preds.append(pred[:20])
        refs.append(ref)
    return preds, refs


def docvqa_answers(n: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Answers of 1 to ~200 characters (log-uniform word counts): half copy a reference with a
    few character edits (OCR-like), half are other text."""
    rng = random.Random(seed)
    words = ["total", "amount", "invoice", "date", "name", "address", "company", "phone", "number", "the", "of", "and", "to", "in", "for", "2019", "12", "$1,250.00", "street", "road", "inc.", "ltd.", "john", "smith", "dear", "sir", "page", "3", "tobacco", "research", "council", "report"]  # fmt: skip

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(int(math.exp(rng.uniform(0, 3.4)))))

    preds, refs = [], []
    for _ in range(n):
        ref = [text() for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.5:
            chars = list(ref[0])
            for _ in range(rng.randint(0, 3)):
                chars[rng.randrange(len(chars))] = rng.choice("abcdefghij0123456789")
            pred = "".join(chars)
        else:
            pred = text()
        preds.append(pred)
        refs.append(ref)
    return preds, refs


def python_levenshtein(a: str, b: str) -> int:
    """The double loop ANLS used before rapidfuzz (the baseline; not project code)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def python_anls(pred: str, ref: str, threshold: float = 0.5) -> float:
    a = " ".join(pred.strip().lower().split())
    b = " ".join(ref.strip().lower().split())
    length = max(len(a), len(b))
    nl = python_levenshtein(a, b) / length if length else 0.0
    return 1.0 - nl if nl < threshold else 0.0


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def naive_grounding(preds, refs) -> list[dict]:
    """One ``score_grounding`` call (one IoU launch, one matching) per specimen."""
    return [score_grounding([p], [r], ["ok"])[0] for p, r in zip(preds, refs, strict=True)]


def pycocotools_ap(preds, refs) -> float | None:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        return None
    gt_anns, dt_anns = [], []
    for img, bs in enumerate(refs, 1):
        for b in bs:
            w, h = b.x2 - b.x1, b.y2 - b.y1
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": img, "category_id": 1,
                            "bbox": [b.x1, b.y1, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
    for img, bs in enumerate(preds, 1):
        for b in bs:
            dt_anns.append({"image_id": img, "category_id": 1, "score": b.score,
                            "bbox": [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1]})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(1, len(refs) + 1)],
                      "categories": [{"id": 1}], "annotations": gt_anns}  # fmt: skip
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dt_anns), "bbox")
        ev.params.maxDets = [100]
        ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
        ev.evaluate()
        ev.accumulate()
    return float(ev.eval["precision"][:, :, 0, 0, -1].mean())


def bench_grounding(n: int, sample: int) -> float:
    warm_p, warm_r = grounding_step(1000, seed=3, scored=True)  # first calls load kernels
    aggregate_grounding(
        score_grounding(warm_p, warm_r, ["ok"] * 1000), ["ok"] * 1000, warm_p, warm_r
    )
    preds, refs = grounding_step(n)
    statuses = ["ok"] * n
    secs, _ = timed(lambda: aggregate_grounding(score_grounding(preds, refs, statuses), statuses))
    k = min(sample, n)
    naive_secs, naive = timed(lambda: naive_grounding(preds[:k], refs[:k]))
    ours = score_grounding(preds[:k], refs[:k], statuses[:k])
    for a, b in zip(ours, naive, strict=True):
        assert a == b, "batched and per-specimen scores differ"
    naive_full = naive_secs * n / k
    print(f"grounding step, {n:,} specimens ({sum(map(len, refs)):,} reference and "
          f"{sum(map(len, preds)):,} predicted boxes): {secs:.2f} s; per-specimen loop "
          f"{naive_secs:.2f} s on {k:,} -> {naive_full:.1f} s at {n:,} "
          f"(x{n / k:.0f}); {naive_full / secs:.1f}x")  # fmt: skip

    scored_preds, scored_refs = grounding_step(n, seed=1, scored=True)
    step_secs, per = timed(lambda: score_grounding(scored_preds, scored_refs, statuses))
    ap_secs, ap = timed(lambda: coco_average_precision(scored_preds, scored_refs))
    agg_secs, agg = timed(lambda: aggregate_grounding(per, statuses, scored_preds, scored_refs))
    assert agg["ap"] == ap["ap"]
    print(f"scored grounding step, {n:,} specimens, every box with a score: "
          f"{step_secs + agg_secs:.2f} s in all (per-specimen metrics {step_secs:.2f} s, "
          f"aggregates with COCO AP {agg_secs:.2f} s)")  # fmt: skip
    columns = {k: [d.get(k) for d in per] for k in per[0]}
    ci_secs, _ = timed(lambda: step_intervals("grounding", columns))
    ap_ci_secs, _ = timed(lambda: ap_intervals(scored_preds, scored_refs))
    print(f"its 95% intervals (issue 19): F1/P/R/acc@0.5 {ci_secs:.2f} s (2,000 resamples), "
          f"AP50/AP {ap_ci_secs:.2f} s (200 resamples)")  # fmt: skip
    k_ap = min(sample // 2, n)
    ours_k, _ = timed(lambda: coco_average_precision(scored_preds[:k_ap], scored_refs[:k_ap]))
    ref_secs, ref_ap = timed(lambda: pycocotools_ap(scored_preds[:k_ap], scored_refs[:k_ap]))
    if ref_ap is None:
        print(f"COCO AP (faster-coco-eval), {n:,} specimens: {ap_secs:.2f} s (pycocotools not "
              "installed: no baseline)")  # fmt: skip
    else:
        mine = coco_average_precision(scored_preds[:k_ap], scored_refs[:k_ap])["ap"]
        assert abs(mine - ref_ap) < 1e-12, (mine, ref_ap)
        print(f"COCO AP with box scores (faster-coco-eval), {n:,} specimens: {ap_secs:.2f} s "
              f"(ap {ap['ap']:.4f}); on {k_ap:,}: {ours_k:.2f} s against pycocotools COCOeval "
              f"{ref_secs:.2f} s, equal AP; {ref_secs / ours_k:.1f}x")  # fmt: skip
    return naive_full / secs


def bench_anls(n: int, sample: int) -> float:
    preds, refs = docvqa_answers(n)
    secs, scores = timed(lambda: [max(anls_single(p, r) for r in rs) for p, rs in zip(preds, refs, strict=True)])  # fmt: skip
    k = min(sample, n)
    naive_secs, naive = timed(lambda: [max(python_anls(p, r) for r in rs) for p, rs in zip(preds[:k], refs[:k], strict=True)])  # fmt: skip
    assert scores[:k] == naive, "rapidfuzz and the Python loop disagree"
    naive_full = naive_secs * n / k
    chars = sum(len(p) for p in preds) / n
    print(f"ANLS step, {n:,} answers (mean {chars:.0f} characters, "
          f"{sum(map(len, refs)):,} references): {secs:.2f} s; Python double loop "
          f"{naive_secs:.2f} s on {k:,} -> {naive_full:.1f} s at {n:,} (x{n / k:.0f}); "
          f"{naive_full / secs:.0f}x")  # fmt: skip
    return naive_full / secs


def _raw_text(spec: Specimen, rng: random.Random) -> str:
    boxes = []
    for b in spec.ref_boxes:
        if rng.random() < 0.8:
            rel = [b.x1 / WIDTH, b.y1 / HEIGHT, b.x2 / WIDTH, b.y2 / HEIGHT]
            boxes.append([round(min(999, max(0, v * 1000 + rng.gauss(0, 8)))) for v in rel])
    boxes = [[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in boxes]
    return json.dumps([{"bbox_2d": box, "label": spec.prompt} for box in boxes])


def build_rescore_store(root: Path, n: int, steps: int, repeat: float = 0.0) -> list[Specimen]:
    """A store as a qwen3_vl grounding run leaves it: specimens table, ``steps`` evaluations
    with their predictions (raw text plus the parsed rows), committed step by step. With
    ``repeat``, that share of each step's outputs (drawn at random) is the text the same
    specimen got at the step before, as a converging model writes."""
    from PIL import Image

    from vieval_runner import store
    from vieval_runner.config import config_from_dict, dump_config

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buf, format="JPEG")
    preds, refs = grounding_step(n, seed=2)
    specimens = [
        Specimen(f"doc_{i:06d}.jpg", "grounding", "object", WIDTH, HEIGHT,
                 image_bytes=buf.getvalue(), ref_boxes=refs[i])
        for i in range(n)
    ]  # fmt: skip
    config = config_from_dict({"run_dir": str(root / "run"), "base_model": str(root / "base"),
                               "store": str(root / "store"), "task": "grounding",
                               "data": {"path": str(root / "split.jsonl")}, "device": "cpu"})  # fmt: skip
    store.create_store(str(root / "store"))
    store.write_specimens(str(root / "store"), specimens, "bench", thumb_px=32)
    rng = random.Random(3)
    last: dict[str, str] = {}
    for k in range(steps):
        rows = []
        for spec in specimens:
            same = spec.specimen_id in last and rng.random() < repeat
            text = last[spec.specimen_id] if same else _raw_text(spec, rng)
            last[spec.specimen_id] = text
            row = store.prediction_row(Prediction(spec.specimen_id, text, "ok", []))
            row.update(input_width=WIDTH, input_height=HEIGHT)
            rows.append(row)
        store.commit_step(
            str(root / "store"),
            {"run_id": "bench", "step": (k + 1) * 100, "status": "ok", "task": "grounding",
             "model_family": "qwen3_vl", "output_format": "qwen3_vl_json",
             "config": json.dumps(dump_config(config))},
            rows,
        )  # fmt: skip
    return specimens


def bench_rescore(n: int, steps: int, sample: int, repeat: float = 0.0) -> None:
    from rich.console import Console

    from vieval_runner import store
    from vieval_runner.pipeline import rescore
    from vieval_runner.store import writer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_secs, specimens = timed(lambda: build_rescore_store(root, n, steps, repeat))
        spent = dict.fromkeys(
            ("store reads", "parse", "metric code", "rows to Arrow", "Delta commits"), 0.0
        )
        scored: list[tuple[list[Specimen], list[Prediction]]] = []

        def clock(name: str, fn: Callable, inside: str | None = None) -> Callable:
            """``fn`` timed into ``spent[name]`` (and taken out of ``spent[inside]``)."""

            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    secs = time.perf_counter() - t0
                    spent[name] += secs
                    if inside:
                        spent[inside] -= secs

            return wrapper

        real_score = rescore.score_predictions

        def keep(config, specs, predictions, device):
            scored.append((specs, predictions))
            return real_score(config, specs, predictions, device)

        reader_cls = type(store.open_store(str(root / "store")))
        patches = [(rescore, "score_predictions", clock("metric code", keep)),
                   (rescore, "frame_columns", clock("metric code", rescore.frame_columns)),
                   (rescore, "_reparse", clock("parse", rescore._reparse)),
                   (rescore, "prediction_rows", clock("rows to Arrow", rescore.prediction_rows)),
                   (rescore.store, "commit_steps", clock("rows to Arrow", store.commit_steps)),
                   (writer, "write_deltalake",
                    clock("Delta commits", writer.write_deltalake, inside="rows to Arrow"))]  # fmt: skip
        patches += [(reader_cls, name, clock("store reads", getattr(reader_cls, name)))
                    for name in ("runs", "steps", "step", "evaluations", "specimens")]  # fmt: skip
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        for obj, name, fn in patches:
            setattr(obj, name, fn)
        try:
            total, done = timed(
                lambda: rescore.rescore_store(str(root / "store"), console=Console(quiet=True))
            )
        finally:
            for obj, name, fn in saved:
                setattr(obj, name, fn)
        assert len(done) == steps
        k = min(sample, n)
        specs, predictions = scored[0]
        naive_secs, _ = timed(lambda: naive_grounding(
            [p.pred_boxes for p in predictions[:k]], [s.ref_boxes for s in specs[:k]]))  # fmt: skip
        naive_all = naive_secs * (n / k) * steps
        other = total - sum(spent.values())
        parts = ", ".join(f"{name} {secs:.1f} s" for name, secs in spent.items())
        what = f", {repeat:.0%} of outputs as at the step before" if repeat else ""
        print(f"rescore{what}, {steps} stored steps x {n:,} specimens (store built in "
              f"{build_secs:.0f} s): {total:.1f} s = {parts}, other {other:.1f} s; scoring with "
              f"the per-specimen "
              f"loop: {naive_secs:.2f} s on {k:,} -> {naive_all:.1f} s for all steps; "
              f"store reads / metric code {spent['store reads'] / spent['metric code']:.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specimens", type=int, default=100_000, help="grounding step size")
    ap.add_argument("--answers", type=int, default=100_000, help="ANLS step size")
    ap.add_argument("--steps", type=int, default=50, help="stored steps to rescore")
    ap.add_argument("--rescore-specimens", type=int, default=2_000, help="specimens per step")
    ap.add_argument(
        "--naive-sample", type=int, default=5_000, help="specimens the naive loops run on"
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's); 1 on a shared, oversubscribed CPU",
    )
    args = ap.parse_args()
    if args.quick:
        args.specimens, args.answers, args.steps = 600, 600, 2
        args.rescore_specimens, args.naive_sample = 100, 200
    # imported once here, not inside the first timed call
    import faster_coco_eval  # noqa: F401
    import torch
    import torchvision  # noqa: F401

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    print(f"bench_scoring: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    bench_anls(args.answers, args.naive_sample)
    bench_rescore(args.rescore_specimens, args.steps, args.naive_sample)
    # a converging run: 76 % of the demo store's outputs are the text of the step before
    bench_rescore(args.rescore_specimens, args.steps, args.naive_sample, repeat=0.76)
    ratio = bench_grounding(args.specimens, args.naive_sample)
    print(f"grounding step {args.specimens:,} specimens: per-specimen loop / batched = {ratio:.1f}")


if __name__ == "__main__":
    main()
