"""The column-wise row builders give exactly what the per-row path (clean/boxes/box_matches)
gives, on tables read back from a real Delta Lake store."""

from __future__ import annotations

import gc
import json
import math
import random

import numpy as np
import pyarrow as pa
import pytest

from vieval_runner.records import Box, Specimen
from vieval_runner.store import BOX, commit_step, create_store, open_store, write_specimens
from vieval_runner.viewer.analysis import box_matches, boxes, clean
from vieval_runner.viewer.rows import all_box_matches, box_lists, specimen_rows, step_rows

NAN, INF = float("nan"), float("inf")


def per_row_step(table: pa.Table, index_of, refs_of) -> list[dict]:
    """The viewer's former per-row path, kept here as the reference."""
    out = []
    for row in table.to_pylist():
        rec = {k: v for k, v in row.items() if k not in ("run_id", "step", "pred_boxes")}
        rec["pred_boxes"] = boxes(row.get("pred_boxes"))
        rec["i"] = index_of(str(row["specimen_id"]))
        rec["matches"] = box_matches(rec["pred_boxes"], refs_of(rec["i"]))
        out.append(clean(rec))
    return out


def per_row_specimens(table: pa.Table) -> list[dict]:
    rows = table.to_pylist()
    rows.sort(key=lambda r: (r.get("written_at") is not None, r.get("written_at") or 0))
    return [
        {
            "id": str(r["specimen_id"]),
            "task": r.get("task") or "grounding",
            "prompt": r.get("prompt") or "",
            "width": r.get("width"),
            "height": r.get("height"),
            "ref_boxes": boxes(r.get("ref_boxes")),
            "ref_answers": [str(a) for a in r.get("ref_answers") or []],
            "meta": json.loads(r["metadata"]) if r.get("metadata") else {},
        }
        for r in rows
    ]


def _rand_box(rng: random.Random, near: Box | None = None) -> Box:
    if near is not None and rng.random() < 0.7:  # often a match, sometimes a loose one
        j = lambda: rng.uniform(-8, 8)  # noqa: E731
        return Box(near.x1 + j(), near.y1 + j(), near.x2 + j(), near.y2 + j(), near.label)
    x, y = rng.uniform(0, 200), rng.uniform(0, 150)
    return Box(x, y, x + rng.uniform(0, 60), y + rng.uniform(0, 50), rng.choice(["", "cat"]))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """120 specimens (0-3 reference boxes, some with none at all), one step of 0-4
    predicted boxes each, NaN/inf metrics, and two predictions with no specimen row."""
    rng = random.Random(7)
    root = str(tmp_path_factory.mktemp("rows") / "store")
    create_store(root)
    specs = []
    for k in range(120):
        refs = [_rand_box(rng) for _ in range(rng.randint(0, 3))]
        specs.append(
            Specimen(f"s{k:03d}", "grounding", "a cat", 320, 240, image_bytes=None, ref_boxes=refs)
        )
    # the thumbnail needs an image: a tiny one per specimen
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (8, 6), (9, 9, 9)).save(buf, "JPEG")
    for s in specs:
        s.image_bytes = buf.getvalue()
    write_specimens(root, specs, dataset_version="v1")
    rows = []
    for k, s in enumerate(specs + [Specimen("orphan-1", "grounding", "", 1, 1)]):
        preds = [_rand_box(rng, rng.choice(s.ref_boxes) if s.ref_boxes else None)]
        preds = preds * rng.randint(0, 2) + [_rand_box(rng) for _ in range(rng.randint(0, 2))]
        if k % 11 == 0:  # a degenerate (zero-area) box
            preds.append(Box(5, 5, 5, 9, "line", 0.5))
        rows.append(
            {
                "specimen_id": s.specimen_id,
                "raw_text": f"<{k}>",
                "pred_boxes": [b.to_row() for b in preds],
                "parse_status": "ok" if preds else "empty",
                "f1": [0.5, NAN, INF, None][k % 4],
                "iou_mean": NAN if k % 3 == 0 else k / 200,
                "tp": k % 3,
                "failure_category": None if k % 5 == 0 else "good",
            }
        )
    commit_step(root, {"run_id": "r", "step": 100}, rows)
    return root


def test_step_rows_equal_the_per_row_path_on_a_stored_step(store):
    reader = open_store(store)
    table = reader.step("r", 100)
    specs = per_row_specimens(reader.specimens())
    refs = {k: s["ref_boxes"] for k, s in enumerate(specs)}
    index = {s["id"]: k for k, s in enumerate(specs)}

    def index_of(sid: str) -> int:
        return index.setdefault(sid, len(index))

    want = per_row_step(table, index_of, lambda i: refs.get(i, []))
    got = step_rows(table, index_of, lambda i: refs.get(i, []))
    assert got == want
    assert len(got) == 121
    assert any(m is not None for r in got for m in r["matches"]), "no match exercised"
    assert any(len(r["matches"]) > 1 for r in got), "no multi-box row exercised"
    assert any(r["f1"] is None for r in got) and any(r["iou_mean"] is None for r in got)
    assert gc.isenabled()


def test_specimen_rows_equal_the_per_row_path_and_newer_versions_come_last(store, tmp_path):
    reader = open_store(store)
    assert specimen_rows(reader.specimens()) == per_row_specimens(reader.specimens())
    # two dataset versions of the same specimen: the newer one must come last
    root = str(tmp_path / "two")
    create_store(root)
    img = open_store(store).specimen_image("s000")
    for version, prompt in (("v1", "old"), ("v2", "new")):
        spec = Specimen("same", "grounding", prompt, 8, 6, image_bytes=img)
        write_specimens(root, [spec], dataset_version=version)
    table = open_store(root).specimens()
    got = specimen_rows(table)
    assert got == per_row_specimens(table)
    assert [r["prompt"] for r in got] == ["old", "new"]


def test_box_lists_skip_null_lists_and_null_boxes_and_clean_nan():
    one = {"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "label": None, "score": NAN}
    two = {"x1": 0.0, "y1": INF, "x2": 5.0, "y2": 6.0, "label": "a", "score": 0.25}
    col = pa.chunked_array(
        [pa.array([[one], None], pa.list_(BOX)), pa.array([[], [None, two]], pa.list_(BOX))]
    )
    got = box_lists(col)
    assert got == [boxes(r) for r in col.to_pylist()]
    assert got == [[[1.0, 2.0, 3.0, 4.0, "", None]], [], [], [[0.0, None, 5.0, 6.0, "a", 0.25]]]
    assert box_lists(pa.chunked_array([], pa.list_(BOX))) == []


def test_all_box_matches_equal_box_matches_on_random_rows():
    rng = np.random.default_rng(3)
    preds, refs = [], []
    for _ in range(2000):
        n_r = int(rng.integers(0, 4))
        ref = [[*(xy := rng.uniform(0, 100, 2)), *(xy + rng.uniform(1, 40, 2)), "", None]
               for _ in range(n_r)]  # fmt: skip
        pred = []
        for _ in range(int(rng.integers(0, 5))):
            if ref and rng.random() < 0.6:
                b = ref[int(rng.integers(0, n_r))]
                pred.append([*(np.asarray(b[:4]) + rng.uniform(-6, 6, 4)), "", None])
            else:
                pred.append([*(xy := rng.uniform(0, 100, 2)), *(xy + rng.uniform(0, 40, 2)), "", 1])
        preds.append([[float(v) if isinstance(v, np.floating) else v for v in b] for b in pred])
        refs.append([[float(v) if isinstance(v, np.floating) else v for v in b] for b in ref])
    preds[-1] = []  # trailing empty rows must not break the batched pass
    refs[-2] = []
    want = [box_matches(p, r) for p, r in zip(preds, refs, strict=True)]
    got = all_box_matches(preds, refs)
    assert got == want
    assert sum(m is not None for row in got for m in row) > 500  # matches exercised
    assert all_box_matches([], []) == []
    assert all_box_matches([[]], [[]]) == [[]]
    nan_box = [[NAN, 0.0, 10.0, 10.0, "", None]]
    assert all_box_matches([nan_box], [[[0.0, 0.0, 10.0, 10.0, "", None]]]) == [[None]]
    assert math.isnan(nan_box[0][0])


def _small_store(root) -> str:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (8, 6), (9, 9, 9)).save(buf, "JPEG")
    create_store(str(root))
    spec = Specimen("a", "grounding", "cat", 80, 60, image_bytes=buf.getvalue(),
                    ref_boxes=[Box(1, 1, 20, 20, "cat")])  # fmt: skip
    write_specimens(str(root), [spec], dataset_version="v1")
    pred = {"specimen_id": "a", "raw_text": "x", "parse_status": "ok",
            "pred_boxes": [Box(2, 2, 20, 20, "cat").to_row()]}  # fmt: skip
    for step in (100, 200):
        commit_step(str(root), {"run_id": "r", "step": step}, [pred])
    return str(root)


@pytest.mark.parametrize("prefetch", [True, False])
def test_viewer_data_builds_the_first_view_before_the_first_request(tmp_path, prefetch):
    """With prefetch the latest step is in memory before anyone asks: it is served even
    after the predictions' files are gone; without, the same request has to read them."""
    import shutil

    from vieval_runner.viewer.data import StoreUnavailable, ViewerData

    root = _small_store(tmp_path / "store")
    data = ViewerData([root], poll_seconds=1000, retries=1, prefetch=prefetch)
    assert data.prefetched.wait(60)
    meta = data.meta()
    run = meta["runs"][0]
    shutil.rmtree(tmp_path / "store" / "predictions")
    if prefetch:
        doc = data.step(run["key"], 200)
        assert doc["step"] == 200 and [r["specimen_id"] for r in doc["rows"]] == ["a"]
        assert doc["rows"][0]["matches"][0][0] == 0  # matched to the reference box
    else:
        with pytest.raises(StoreUnavailable):
            data.step(run["key"], 200)
