"""Small real Delta stores for the viewer's tests: grounding and VQA steps written with the
store's own writer API (test-only; the product never imports ``vieval_runner.testing``)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from vieval_runner.records import Box, Specimen
from vieval_runner.store import (
    commit_step,
    create_store,
    record_failed_evaluation,
    write_specimens,
    write_training_log,
)

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'

# (id, width, height, prompt, reference boxes) - sizes differ so scaling bugs show.
GROUNDING = [
    ("cat-001", 640, 480, "the cat", [(100, 120, 300, 400, "cat")]),
    ("dogs-002", 400, 600, "dog", [(20, 30, 180, 250, "dog"), (220, 300, 380, 560, "dog")]),
    ("car-003", 800, 300, "red car", [(500, 60, 760, 280, "red car")]),
    ("empty-004", 320, 320, "a unicorn", []),
    ("bird-005", 500, 500, "bird", [(200, 50, 320, 160, "bird")]),
    ("junk-006", 256, 192, "the lamp", [(40, 40, 120, 150, "lamp")]),
]
VQA = [
    ("q-001", 320, 240, "What colour is the square?", ["red", "red square"]),
    ("q-002", 240, 320, "How many circles are there?", ["two", "2"]),
    ("q-003", 300, 300, "What is written on the sign?", ["stop here now"]),
]
STEPS = (0, 100, 200, 300)


def _image(w: int, h: int, boxes, seed: int) -> bytes:
    img = Image.new("RGB", (w, h), (235 - 9 * seed, 240, 225 + 4 * seed))
    draw = ImageDraw.Draw(img)
    for i in range(0, w, 40):
        draw.line([(i, 0), (i, h)], fill=(215, 220, 228))
    for k, (x1, y1, x2, y2, _) in enumerate(boxes):
        draw.ellipse([x1, y1, x2, y2], fill=((60 + 70 * k) % 255, 90 + 20 * seed, 160))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def grounding_specimens() -> list[Specimen]:
    return [
        Specimen(
            sid,
            "grounding",
            prompt,
            w,
            h,
            image_bytes=_image(w, h, refs, i),
            ref_boxes=[Box(*r) for r in refs],
        )  # fmt: skip
        for i, (sid, w, h, prompt, refs) in enumerate(GROUNDING)
    ]


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_prediction(spec: tuple, step: int, run: str) -> dict:
    """A deterministic prediction that improves with the step (run-a gets worse at the end)."""
    sid, w, h, _, refs = spec
    quality = {0: 0.0, 100: 0.5, 300: 0.8 if run == "run-a" else 1.0}.get(step, 1.0)
    shift = (1 - quality) * 40
    if sid == "junk-006" and step < 200:
        return {"specimen_id": sid, "raw_text": XSS, "pred_boxes": [], "parse_status": "malformed",
                "tp": 0, "fp": 0, "fn": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                "iou_mean": None, "failure_category": "unparseable"}  # fmt: skip
    boxes = [Box(min(w, x1 + shift), min(h, y1 + shift / 2), min(w, x2 + shift), y2, lab,
                 # run-b scores its boxes (as box_scores does), run-a does not
                 score=round(0.95 - 0.1 * k, 2) if run == "run-b" else None)
             for k, (x1, y1, x2, y2, lab) in enumerate(refs)]  # fmt: skip
    if sid == "dogs-002" and step == 0:
        boxes = boxes[:1]  # one missed
    if sid == "empty-004" and (step == 0 or (step == 300 and run == "run-a")):
        boxes = [Box(10, 10, 90, 60, "unicorn")]  # a false positive
    ious = [max((_iou(b.as_list(), r[:4]) for r in refs), default=0.0) for b in boxes]
    tp = sum(v >= 0.5 for v in ious)
    fp, fn = len(boxes) - tp, len(refs) - tp
    p = tp / len(boxes) if boxes else (1.0 if not refs else 0.0)
    r = tp / len(refs) if refs else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    matched = [v for v in ious if v >= 0.5]
    cat = "inconsistent" if fp and fn else "missed" if fn else "false_positive" if fp else (
        "loose" if matched and min(matched) < 0.75 else "good")  # fmt: skip
    raw = " ; ".join(f"{b.label} [{b.x1:.0f}, {b.y1:.0f}, {b.x2:.0f}, {b.y2:.0f}]" for b in boxes)
    return {"specimen_id": sid, "raw_text": raw or "no objects", "pred_boxes": boxes,
            "parse_status": "ok" if boxes else "empty", "tp": tp, "fp": fp, "fn": fn,
            "precision": p, "recall": r, "f1": f1,
            "iou_mean": sum(matched) / len(matched) if matched else None,
            "failure_category": cat}  # fmt: skip


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


FRAME_ADVICE = (
    "coordinate frame: the boxes fit the references as input_pixel (F1@0.5 0.90) far better "
    "than as the configured relative_1000 (0.10); set output_format=qwen25_vl_json"
)


def commit_grounding_step(root: Path, run: str, step: int) -> None:
    rows = [grounding_prediction(spec, step, run) for spec in GROUNDING]
    ev = {"run_id": run, "step": step, "task": "grounding", "checkpoint_path": f"ckpt-{step}",
          "f1": _mean(rows, "f1"), "precision": _mean(rows, "precision"),
          "recall": _mean(rows, "recall"), "iou_mean": _mean(rows, "iou_mean"),
          "parse_failure_rate": sum(r["parse_status"] == "malformed" for r in rows) / len(rows)}  # fmt: skip
    if run == "run-b" and step == 0:  # the coordinate-frame check fired on this step
        ev.update(coords_best_fit="input_pixel", coords_best_fit_f1=0.9, coords_advice=FRAME_ADVICE)
    commit_step(str(root), ev, rows)


def make_grounding_store(root: Path, runs=("run-a", "run-b"), steps=STEPS) -> Path:
    """Two runs x four steps, a training log, one failed evaluation."""
    create_store(str(root))
    write_specimens(str(root), grounding_specimens(), dataset_version="v1", thumb_px=256)
    for run in runs:
        for step in steps:
            commit_grounding_step(root, run, step)
        log = [
            {"step": s, "loss": 2.0 / (1 + s / 50), "epoch": s / 100} for s in range(10, 310, 20)
        ]
        log += [{"step": s, "eval_loss": 1.5 / (1 + s / 120)} for s in (100, 200, 300)]
        write_training_log(str(root), run, log)
    record_failed_evaluation(str(root), {"run_id": runs[0], "step": 400, "error": "corrupt shard"})
    return root


def make_vqa_store(root: Path) -> Path:
    create_store(str(root))
    specs = [Specimen(sid, "vqa", q, w, h, image_bytes=_image(w, h, [(w / 4, h / 4, w / 2, h / 2, "")], i),
                      ref_answers=refs) for i, (sid, w, h, q, refs) in enumerate(VQA)]  # fmt: skip
    write_specimens(str(root), specs, dataset_version="v1", thumb_px=256)
    answers = {0: ["blue", "three", "go"], 100: ["red square", "2", "stop now please"]}
    for step, ans in answers.items():
        rows = []
        for (sid, _, _, _, refs), a in zip(VQA, ans, strict=True):
            em = float(a in refs)
            best = max(refs, key=lambda r: len(set(r.split()) & set(a.split())))
            common = len(set(best.split()) & set(a.split()))
            f1 = 0.0 if not common else 2 * common / (len(best.split()) + len(a.split()))
            cat = "good" if em else ("incomplete" if common else "wrong")
            rows.append({"specimen_id": sid, "raw_text": a, "pred_answer": a, "parse_status": "ok",
                         "exact_match": em, "token_f1": f1, "failure_category": cat})  # fmt: skip
        ev = {"run_id": "vqa-run", "step": step, "task": "vqa",
              "exact_match": _mean(rows, "exact_match"), "token_f1": _mean(rows, "token_f1")}  # fmt: skip
        commit_step(str(root), ev, rows)
    return root


# ----------------------------------------------------------------------------- fixtures


_WRITER = """
import json, sys
from vieval_runner.store import commit_step
job = json.load(sys.stdin)
commit_step(job["root"], job["eval_row"], job["rows"])
"""


def kill_commit_at(root: Path | str, point: str, eval_row: dict, rows: list[dict]) -> None:
    """``commit_step(root, eval_row, rows)`` in a real writer process, SIGKILLed at ``point``
    of the commit protocol (``VIEVAL_TEST_PAUSE_AT``; rows and row as JSON)."""
    tree = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, VIEVAL_TEST_PAUSE_AT=point, PYTHONPATH=tree)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER],
        env=env,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc.stdin.write(json.dumps({"root": str(root), "eval_row": eval_row, "rows": rows}))
        proc.stdin.close()
        line = proc.stderr.readline()  # the writer waits at the point until killed
        if line.strip() != f"vieval-paused {point}":
            raise AssertionError(f"the writer did not pause at {point}: {line}{proc.stderr.read()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
