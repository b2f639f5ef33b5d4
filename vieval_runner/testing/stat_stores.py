"""A real Delta store big enough for statistics: a few hundred grounding specimens of three
sizes and labels, with metadata, evaluated at steps whose hit rates differ by a lot (0 -> 100)
and by almost nothing (200 -> 300). Scores come from the project's scoring (test-only)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from vieval_runner import scoring
from vieval_runner.records import Box, Specimen
from vieval_runner.store import commit_step, create_store, write_specimens, write_training_log

HIT_RATE = {0: 0.2, 100: 0.6, 200: 0.8, 300: 0.81}
SIDES = {"small": 20.0, "medium": 60.0, "large": 150.0}
LABELS = ("cat", "dog", "car")
SOURCES = ("web", "phone")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 210, 220)).save(buf, "PNG")
    return buf.getvalue()


def stat_specimens(n: int = 240, seed: int = 0) -> list[Specimen]:
    rng = np.random.default_rng(seed)
    png, out = _png(), []
    for i in range(n):
        size = list(SIDES)[i % 3]
        label = LABELS[(i // 3) % 3]
        side = SIDES[size] * rng.uniform(0.9, 1.1)
        x, y = rng.uniform(0, 300, 2)
        out.append(
            Specimen(
                f"s{i:04d}", "grounding", f"the {label}", 640, 480, image_bytes=png,
                ref_boxes=[Box(x, y, x + side, y + side, label)],
                metadata={"source": SOURCES[i % 2], "index": i},
            )
        )  # fmt: skip
    return out


def _predict(spec: Specimen, hit: bool, rng) -> list[Box]:
    ref = spec.ref_boxes[0]
    side = ref.x2 - ref.x1
    shift = rng.uniform(0, 0.05) * side if hit else side * 1.5
    return [Box(ref.x1 + shift, ref.y1, ref.x2 + shift, ref.y2, ref.label,
                score=float(rng.uniform(0.5, 1.0) if hit else rng.uniform(0, 0.8)))]  # fmt: skip


# a label that decoding made of bytes that were not UTF-8 (the viewer must show it escaped)
UNDECODABLE_LABEL = "caf\ufffd\ufffd"


def build_stat_store(
    root: Path, n: int = 240, run: str = "run", seed: int = 0, training_log: bool = False
) -> list[Specimen]:
    """Write the store (specimens + one step per ``HIT_RATE`` entry); returns the specimens.

    With ``training_log``, a loss logged every 11 steps (not at the evaluated steps), and
    specimen ``s0000``'s predicted box at step 300 carries `UNDECODABLE_LABEL`."""
    specimens = stat_specimens(n, seed)
    create_store(str(root))
    write_specimens(str(root), specimens, "v1")
    refs = [s.ref_boxes for s in specimens]
    for step, rate in HIT_RATE.items():
        rng = np.random.default_rng(seed + step + 1)
        hits = rng.uniform(size=n) < rate
        preds = [_predict(s, bool(h), rng) for s, h in zip(specimens, hits, strict=True)]
        if training_log and step == 300:
            b = preds[0][0]
            preds[0] = [Box(b.x1, b.y1, b.x2, b.y2, UNDECODABLE_LABEL, b.score)]
        statuses = ["ok"] * n
        per = scoring.score_grounding(preds, refs, statuses)
        agg = scoring.aggregate_grounding(per, statuses, preds, refs)
        columns = {k: [d[k] for d in per] for k in per[0]}
        ev = {"run_id": run, "step": step, "task": "grounding", "dataset_version": "v1",
              "checkpoint_path": f"ckpt-{step}",
              **{k: agg[k] for k in ("f1", "precision", "recall", "iou_mean", "acc_at_50", "ap50",
                                     "ap", "parse_failure_rate")},
              "ci95": scoring.step_intervals("grounding", columns, preds, refs)}  # fmt: skip
        rows = [
            {"specimen_id": s.specimen_id, "raw_text": "x", "pred_boxes": p, "parse_status": "ok",
             **{k: d[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1", "iou_mean",
                                  "acc_at_50", "failure_category")}}
            for s, p, d in zip(specimens, preds, per, strict=True)
        ]  # fmt: skip
        commit_step(str(root), ev, rows)
    if training_log:
        log = [{"step": s, "loss": 2.0 / (1 + s / 50), "epoch": s / 300} for s in range(0, 310, 11)]
        write_training_log(str(root), run, log)
    return specimens


def scored_step(
    seed: int,
    n: int,
    *,
    sizes=lambda rng: rng.uniform(5, 100, 2),
    jitter: tuple[float, ...] = (2.0, 8.0, 20.0),
    score_decimals: int | None = None,
    empty: tuple[int, int] = (7, 3),
    shuffle: bool = True,
) -> tuple[list[list[Box]], list[list[Box]]]:
    """A random step of scored detections for AP tests against pycocotools: 0-3 references
    per image (``sizes(rng)`` gives a box's (w, h)), 80 % of them found with normal jitter of
    one of ``jitter``'s scales, 0-2 stray boxes, uniform scores (rounded to
    ``score_decimals``: ties), no predictions on images ``i % empty[0] == empty[1]``, and the
    predictions of an image in random order when ``shuffle``."""
    rng = np.random.default_rng(seed)
    preds, refs = [], []
    for i in range(n):
        ref = []
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(0, 300, 2)
            w, h = sizes(rng)
            ref.append(Box(x, y, x + w, y + h))
        pred = []
        for b in ref:
            if rng.uniform() < 0.8:
                j = rng.normal(0, rng.choice(jitter), 4)
                x1, y1, x2, y2 = np.array(b.as_list()) + j
                pred.append(Box(min(x1, x2), min(y1, y2), max(x1, x2) + 1, max(y1, y2) + 1))
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 300, 2)
            w, h = sizes(rng)
            pred.append(Box(x, y, x + w, y + h))
        scores = [float(rng.uniform()) for _ in pred]
        if score_decimals is not None:
            scores = [round(v, score_decimals) for v in scores]
        pred = [Box(*b.as_list(), score=v) for b, v in zip(pred, scores, strict=True)]
        if i % empty[0] == empty[1]:
            pred = []
        if shuffle and pred:
            pred = list(rng.permutation(np.array(pred, dtype=object)))
        preds.append(pred)
        refs.append(ref)
    return preds, refs


def cocoeval_precision(preds, refs, max_dets=(1, 10, 100)):
    """pycocotools' accumulated precision [iou, recall, area] at the last of ``max_dets``
    (areas: all, small, medium, large; COCOeval sorts ``maxDets``)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1]

    anns = [
        {
            "id": k,
            "image_id": img,
            "category_id": 1,
            "bbox": xywh(b),
            "area": (b.x2 - b.x1) * (b.y2 - b.y1),
            "iscrowd": 0,
        }
        for k, (img, b) in enumerate(((i, b) for i, bs in enumerate(refs, 1) for b in bs), 1)
    ]
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in range(1, len(refs) + 1)],
                  "categories": [{"id": 1, "name": "x"}], "annotations": anns}  # fmt: skip
    res = [{"image_id": i, "category_id": 1, "bbox": xywh(b), "score": b.score}
           for i, bs in enumerate(preds, 1) for b in bs]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(res), "bbox")
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"][:, :, 0, :, -1]
