"""The viewer's HTTP server against real Delta stores built with the store's writer API."""

from __future__ import annotations

import http.client
import io
import json
import subprocess
import sys
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vieval_runner.records import Box, Specimen
from vieval_runner.store import (
    commit_step,
    create_store,
    open_store,
    record_failed_evaluation,
    write_specimens,
    write_training_log,
)
from vieval_runner.viewer import serve

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


def commit_grounding_step(root: Path, run: str, step: int) -> None:
    rows = [grounding_prediction(spec, step, run) for spec in GROUNDING]
    ev = {"run_id": run, "step": step, "task": "grounding", "checkpoint_path": f"ckpt-{step}",
          "f1": _mean(rows, "f1"), "precision": _mean(rows, "precision"),
          "recall": _mean(rows, "recall"), "iou_mean": _mean(rows, "iou_mean"),
          "parse_failure_rate": sum(r["parse_status"] == "malformed" for r in rows) / len(rows)}  # fmt: skip
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
@pytest.fixture(scope="module")
def grounding_store(tmp_path_factory) -> Path:
    return make_grounding_store(tmp_path_factory.mktemp("viewer") / "store")


@pytest.fixture(scope="module")
def server(grounding_store):
    srv = serve([str(grounding_store)], port=0, poll_seconds=0.2).start()
    yield srv
    srv.shutdown()


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(url: str):
    status, headers, body = get(url)
    assert status == 200, (url, status, body[:300])
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)


def raw_get(srv, path: str) -> tuple[int, bytes]:
    """Send ``path`` byte for byte (urllib would normalise some of it)."""
    host, port = srv.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", f"{host}:{port}")
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


# ----------------------------------------------------------------------------- tests
def test_meta_lists_runs_steps_aggregates_best_and_overfitting(server, grounding_store):
    meta = get_json(server.url + "api/meta")
    assert meta["waiting"] is False
    assert meta["task"] == "grounding"
    assert meta["n_specimens"] == len(GROUNDING)
    assert [s["root"] for s in meta["stores"]] == [str(grounding_store)]
    assert meta["stores"][0]["version"]["predictions"] >= 1
    runs = {r["run_id"]: r for r in meta["runs"]}
    assert set(runs) == {"run-a", "run-b"}
    a, b = runs["run-a"], runs["run-b"]
    assert a["steps"] == list(STEPS) and a["task"] == "grounding"
    assert [g["step"] for g in a["aggregates"]] == list(STEPS)
    # run-a peaks at step 200 and drops at 300: best step and overfitting signal
    assert a["best"]["step"] == 200 and a["best"]["metric"] == "f1"
    assert a["overfitting"]["best_step"] == 200 and a["overfitting"]["last_step"] == 300
    assert b["overfitting"] is None
    assert a["failed"] == [{"step": 400, "error": "corrupt shard"}]
    assert 400 not in a["steps"]
    assert any(row["eval_loss"] is not None for row in a["training_log"])
    assert [row["step"] for row in a["training_log"]] == sorted(
        r["step"] for r in a["training_log"]
    )
    assert set(a["eval_ids"]) == {str(s) for s in STEPS}
    assert "missed" in meta["failure_actions"] and meta["failure_actions"]["missed"]


def test_specimens_steps_and_images_match_the_store(server, grounding_store):
    reader = open_store(str(grounding_store))
    doc = get_json(server.url + "api/specimens")
    specs = {s["id"]: s for s in doc["specimens"]}
    assert set(specs) == {g[0] for g in GROUNDING}
    for sid, w, h, prompt, refs in GROUNDING:
        s = specs[sid]
        assert (s["width"], s["height"], s["prompt"], s["task"]) == (w, h, prompt, "grounding")
        assert s["ref_boxes"] == [[float(v) for v in r[:4]] + [r[4], None] for r in refs]
        assert "image_bytes" not in s
        status, headers, body = get(server.url + s["img"])
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        assert body == reader.specimen_image(sid)
        status, _, thumb = get(server.url + s["thumb"])
        assert status == 200 and Image.open(io.BytesIO(thumb)).size[0] <= 112

    meta = get_json(server.url + "api/meta")
    run = next(r for r in meta["runs"] if r["run_id"] == "run-a")
    step = get_json(server.url + f"api/step?run={run['key']}&step=100")
    assert step["step"] == 100 and step["eval_id"] == run["eval_ids"]["100"]
    stored = {r["specimen_id"]: r for r in reader.step("run-a", 100).to_pylist()}
    assert len(step["rows"]) == len(GROUNDING)
    by_index = {s["i"]: s["id"] for s in doc["specimens"]}
    for row in step["rows"]:
        ref = stored[by_index[row["i"]]]
        assert row["specimen_id"] == ref["specimen_id"]
        assert row["pred_boxes"] == [[b["x1"], b["y1"], b["x2"], b["y2"], b["label"], b["score"]]
                                     for b in ref["pred_boxes"]]  # fmt: skip
        assert row["f1"] == ref["f1"] and row["failure_category"] == ref["failure_category"]


def test_unknown_run_step_or_image_is_404(server):
    assert get(server.url + "api/step?run=r0&step=999")[0] == 404
    assert get(server.url + "api/step?run=nope&step=100")[0] == 404
    assert get(server.url + "api/step?run=r0&step=abc")[0] == 400
    assert get(server.url + "img/99999")[0] == 404
    assert get(server.url + "thumb/99999")[0] == 404


@pytest.mark.parametrize(
    "path",
    [
        "/../pyproject.toml",
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/static/../../../pyproject.toml",
        "/app.js/../server.py",
        "/server.py",
        "/data.py",
        "/static/app.js",
        "/etc/passwd",
        "//etc/passwd",
        "/img/../../../etc/passwd",
        "/img/%2e%2e%2fserver.py",
        "/img/-1",
        "/img//etc/passwd",
        "/thumb/1/../../server.py",
        "/index.html/..%2f..%2fdata.py",
        "/C:/Windows/win.ini",
        "/api/../api/../../pyproject.toml",
    ],
)
def test_traversal_and_absolute_paths_are_refused(server, path):
    status, body = raw_get(server, path)
    assert status == 404
    assert b"root:" not in body and b"[build-system]" not in body and b"import" not in body


def test_only_whitelisted_static_files_are_served(server):
    status, headers, body = get(server.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="app.js">' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert get(server.url + "app.js")[0] == 200
    assert get(server.url + "style.css")[0] == 200


def test_model_output_markup_comes_back_as_json_data(server):
    meta = get_json(server.url + "api/meta")
    key = next(r["key"] for r in meta["runs"] if r["run_id"] == "run-a")
    status, headers, body = get(server.url + f"api/step?run={key}&step=0")
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    row = next(r for r in json.loads(body)["rows"] if r["specimen_id"] == "junk-006")
    assert row["raw_text"] == XSS and row["parse_status"] == "malformed"
    assert b"<script>" not in get(server.url)[2]  # no data or inline script in the page


def test_nonexistent_store_waits_then_shows_the_first_step(tmp_path):
    root = tmp_path / "not-yet"
    with serve([str(root)], port=0, poll_seconds=0.1).start() as srv:
        meta = get_json(srv.url + "api/meta")
        assert meta["waiting"] is True and meta["runs"] == []
        assert "Waiting for the first checkpoint" in meta["message"]
        assert get(srv.url + "api/specimens")[0] == 200
        create_store(str(root))
        write_specimens(str(root), grounding_specimens(), dataset_version="v1", thumb_px=64)
        time.sleep(0.15)
        assert get_json(srv.url + "api/meta")["waiting"] is True  # tables, but no evaluation
        commit_grounding_step(root, "run-a", 100)
        time.sleep(0.15)
        meta = get_json(srv.url + "api/meta")
        assert meta["waiting"] is False
        assert meta["runs"][0]["steps"] == [100]
        assert len(get_json(srv.url + "api/step?run=r0&step=100")["rows"]) == len(GROUNDING)


def test_several_stores_side_by_side(tmp_path, grounding_store):
    vqa = make_vqa_store(tmp_path / "vqa")
    with serve([str(grounding_store), str(vqa)], port=0, poll_seconds=0.1).start() as srv:
        meta = get_json(srv.url + "api/meta")
        assert [r["run_id"] for r in meta["runs"]] == ["run-a", "run-b", "vqa-run"]
        assert len({r["key"] for r in meta["runs"]}) == 3
        vrun = meta["runs"][2]
        assert vrun["task"] == "vqa" and vrun["steps"] == [0, 100]
        assert vrun["best"] == {"step": 100, "metric": "token_f1", "value": vrun["best"]["value"]}
        assert meta["task"] == "mixed"
        specs = get_json(srv.url + "api/specimens")["specimens"]
        assert len(specs) == len(GROUNDING) + len(VQA)
        q1 = next(s for s in specs if s["id"] == "q-001")
        assert q1["ref_answers"] == ["red", "red square"] and q1["task"] == "vqa"
        rows = get_json(srv.url + f"api/step?run={vrun['key']}&step=100")["rows"]
        assert {r["i"] for r in rows} == {s["i"] for s in specs if s["task"] == "vqa"}
        assert get(srv.url + q1["img"])[0] == 200


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_viewer import commit_grounding_step
    root = Path({root!r})
    for i in range(6):
        commit_grounding_step(root, "run-b", 100)          # replace an existing step
        commit_grounding_step(root, "run-c", 1000 + i)     # a new run growing
    """
)


def test_reads_while_a_writer_commits_never_fail(tmp_path):
    root = make_grounding_store(tmp_path / "busy", runs=("run-b",), steps=(0, 100))
    code = WRITER.format(tests=str(Path(__file__).parent), root=str(root))
    with serve([str(root)], port=0, poll_seconds=0.05).start() as srv:
        writer = subprocess.Popen([sys.executable, "-c", code])
        statuses: list[tuple[str, int]] = []

        def hammer(_: int) -> None:
            while writer.poll() is None:
                status, _, body = get(srv.url + "api/meta")
                statuses.append(("meta", status))
                if status != 200:
                    continue
                for run in json.loads(body)["runs"]:
                    for step in run["steps"][-2:]:
                        url = f"{srv.url}api/step?run={run['key']}&step={step}"
                        statuses.append((url, get(url)[0]))

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(hammer, range(3)))
        assert writer.wait(timeout=120) == 0
        assert statuses and all(code == 200 for _, code in statuses), [
            s for s in statuses if s[1] != 200
        ][:5]
        meta = get_json(srv.url + "api/meta")
        assert next(r for r in meta["runs"] if r["run_id"] == "run-c")["steps"] == list(
            range(1000, 1006)
        )


def test_box_matches_agree_with_scoring(server):
    """The page colours boxes by the server's matches: they must be scoring's matches."""
    from vieval_runner.scoring import score_grounding

    specs = {s["i"]: s for s in get_json(server.url + "api/specimens")["specimens"]}
    meta = get_json(server.url + "api/meta")
    for run in meta["runs"]:
        for step in run["steps"]:
            rows = get_json(server.url + f"api/step?run={run['key']}&step={step}")["rows"]
            preds = [[Box(*b[:5]) for b in r["pred_boxes"]] for r in rows]
            refs = [[Box(*b[:5]) for b in specs[r["i"]]["ref_boxes"]] for r in rows]
            scored = score_grounding(preds, refs, [r["parse_status"] for r in rows])
            for row, ref in zip(rows, scored, strict=True):
                matched = [m for m in row["matches"] if m is not None]
                assert len(row["matches"]) == len(row["pred_boxes"])
                assert len(matched) == ref["tp"]
                assert len({m[0] for m in matched}) == len(matched)  # one-to-one
                if matched:
                    mean = sum(m[1] for m in matched) / len(matched)
                    assert mean == pytest.approx(ref["iou_mean"], abs=1e-4)
