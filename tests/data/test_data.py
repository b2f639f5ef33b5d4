"""Validation data adapters on the real COCO sample and on built JSONL / HF / RefCOCO splits."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vieval_runner.data import (
    FORMATS,
    DataError,
    clean_category_name,
    dataset_version,
    detect_format,
    load_specimens,
)
from vieval_runner.records import Box

COCO = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco-sample"
if not COCO.is_dir():
    COCO = Path("/work/shared/data/coco-sample")

# Every category name of the sample, cleaned. Category 0 is Roboflow's unused project name.
CLEANED = {
    "Arduino Mega 2560 -Black-": "Arduino Mega 2560 (black)",
    "Arduino Mega 2560 -Blue-": "Arduino Mega 2560 (blue)",
    "Arduino Mega 2560 -Yellow-": "Arduino Mega 2560 (yellow)",
    "Arduino Uno -Black-": "Arduino Uno (black)",
    "Arduino Uno -Green-": "Arduino Uno (green)",
    "Arduino Uno Camera Shield": "Arduino Uno Camera Shield",
    "Arduino Uno WiFi Shield": "Arduino Uno WiFi Shield",
    "Arduino-Due": "Arduino Due",
    "Arduino-Micro": "Arduino Micro",
    "Arduino-Nano": "Arduino Nano",
    "Arduino-ProMini": "Arduino ProMini",
    "Arduino-Zero": "Arduino Zero",
    "Arduino-leonardo": "Arduino leonardo",
    "ESP32": "ESP32",
    "Esp8266": "Esp8266",
    "Jetson Nano": "Jetson Nano",
    "Jetson TX2": "Jetson TX2",
    "Raspberry Pi 1 B-": "Raspberry Pi 1 B+",
    "Raspberry Pi 3 B-": "Raspberry Pi 3 B+",
    "Raspberry-Pi-1-A-": "Raspberry Pi 1 A+",
    "Raspberry-Pi-2-B": "Raspberry Pi 2 B",
    "Raspberry-Pi-3-A-": "Raspberry Pi 3 A+",
    "Raspberry-Pi-3-B": "Raspberry Pi 3 B",
    "Raspberry-Pi-4-B": "Raspberry Pi 4 B",
    "Raspberry-Pi-5": "Raspberry Pi 5",
    "Raspberry-Pi-Zero": "Raspberry Pi Zero",
    "Raspberry-Pi-Zero-2-W": "Raspberry Pi Zero 2 W",
    "Raspberry-Pi-Zero-W": "Raspberry Pi Zero W",
    "Raspberry-Pi-Zero-WH": "Raspberry Pi Zero WH",
    "STM32": "STM32",
    "TelosB": "TelosB",
    "Wemos": "Wemos",
}


def _coco_json() -> dict:
    return json.loads((COCO / "annotations.json").read_text())


def _img(path: Path, size=(64, 48), color=(200, 30, 30), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- the real COCO sample -------------------------------------------------------------------


def test_category_names_all_cleaned():
    cats = _coco_json()["categories"]
    assert len(cats) == 33
    real = {c["name"]: clean_category_name(c["name"]) for c in cats if c["id"] != 0}
    assert real == CLEANED
    assert len(set(real.values())) == 32  # no two boards merged (3 B vs 3 B+)


def test_coco_sample_specimens():
    raw = _coco_json()
    res = load_specimens(COCO, "auto", "grounding")
    files = {i["id"]: i["file_name"] for i in raw["images"]}
    cats = {c["id"]: c["name"] for c in raw["categories"]}
    # expected straight from the raw file: one specimen per (image, category) pair
    pairs = {(files[a["image_id"]], CLEANED[cats[a["category_id"]]]) for a in raw["annotations"]}
    assert len(pairs) == 38  # 35 annotated images, 3 of them with ESP32 + STM32
    assert {(s.image_path and Path(s.image_path).name, s.prompt) for s in res.specimens} == pairs
    assert [s.specimen_id for s in res.specimens] == [
        f"{Path(s.image_path).name}#{s.prompt}" for s in res.specimens
    ]
    assert res.skipped == []
    assert all(s.task == "grounding" and (s.width, s.height) == (640, 640) for s in res.specimens)
    assert all(b.label == s.prompt for s in res.specimens for b in s.ref_boxes)
    assert sum(len(s.ref_boxes) for s in res.specimens) == 54 - 1  # one exact duplicate dropped
    by_id = {s.specimen_id: s for s in res.specimens}
    # the unannotated screenshot is skipped with a note
    shot = files[1927]
    assert not any(s.specimen_id.startswith(shot) for s in res.specimens)
    assert any("1927" in w and "no annotations" in w for w in res.warnings)
    # exact duplicate (annotations 321/322) kept once; near duplicate (874/875) kept twice
    assert by_id[f"{files[303]}#Arduino leonardo"].ref_boxes == [
        Box(88, 66, 552, 576, "Arduino leonardo")
    ]
    assert any("322" in w and "321" in w and "duplicate" in w for w in res.warnings)
    assert len(by_id[f"{files[831]}#Raspberry Pi 3 B+"].ref_boxes) == 2
    # fractional xywh -> xyxy: annotation 35 is [3, 90, 316.667, 423.333]
    ann35 = next(a for a in raw["annotations"] if a["id"] == 35)
    sid = f"{files[ann35['image_id']]}#{CLEANED[cats[ann35['category_id']]]}"
    (box,) = by_id[sid].ref_boxes
    assert box.as_list() == pytest.approx([3, 90, 3 + 316.667, 90 + 423.333])
    # boxes equal pycocotools' own reading of the file, converted to xyxy
    from pycocotools.coco import COCO as PyCOCO

    ref = PyCOCO(str(COCO / "annotations.json"))
    for s in res.specimens:
        img_id = next(i for i, f in files.items() if f == Path(s.image_path).name)
        anns = ref.loadAnns(ref.getAnnIds(imgIds=[img_id]))
        want = {
            (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
            for a in anns
            if CLEANED[ref.cats[a["category_id"]]["name"]] == s.prompt
        }
        assert {tuple(b.as_list()) for b in s.ref_boxes} == want


def test_coco_unannotated_as_error():
    with pytest.raises(DataError, match=r"annotations\.json: image 1927 .*no annotations"):
        load_specimens(COCO, "coco", "grounding", unannotated="error")
    res = load_specimens(COCO, "coco", "grounding", unannotated="error", strict=False)
    assert [b.row for b in res.skipped] == ["image 1927"] and len(res.specimens) == 38


def test_dataset_version_stable_and_content_sensitive(tmp_path: Path):
    v = load_specimens(COCO, "auto", "grounding").dataset_version
    copy = shutil.copytree(COCO, tmp_path / "copy")
    assert load_specimens(copy, "auto", "grounding").dataset_version == v  # moved != changed
    img = next(copy.glob("LECA3*.jpg"))
    data = bytearray(img.read_bytes())
    data[len(data) // 2] ^= 0xFF
    img.write_bytes(data)
    assert load_specimens(copy, "auto", "grounding").dataset_version != v
    res = load_specimens(COCO, "auto", "grounding", limit=5)
    assert len(res.specimens) == 5 and res.dataset_version == dataset_version(res.specimens)
    assert res.dataset_version != v


def _coco_variant(tmp_path: Path, edit) -> Path:
    d = tmp_path / "coco"
    shutil.copytree(COCO, d)
    raw = _coco_json()
    edit(raw)
    (d / "annotations.json").write_text(json.dumps(raw))
    return d


@pytest.mark.parametrize(
    "bbox, problem",
    [
        ([10, 10, -5, 20], "negative width"),
        ([600, 10, 100, 20], "outside the 640x640 image"),
        ([10, float("nan"), 5, 5], "NaN"),
    ],
)
def test_coco_bad_box(tmp_path: Path, bbox, problem):
    def edit(raw):
        raw["annotations"][0]["bbox"] = bbox

    d = _coco_variant(tmp_path, edit)
    with pytest.raises(DataError) as e:
        load_specimens(d, "coco", "grounding")
    assert "annotations.json: annotation 4 (image 4)" in str(e.value) and problem in str(e.value)
    res = load_specimens(d, "coco", "grounding", strict=False)
    assert len(res.specimens) == 37 and res.skipped[0].specimen_id.endswith("#Raspberry Pi 5")


def test_coco_missing_and_corrupt_image(tmp_path: Path):
    d = _coco_variant(tmp_path, lambda raw: None)
    next(d.glob("LECA3*.jpg")).unlink()
    next(d.glob("BEBB2*.jpg")).write_bytes(b"not an image at all")
    with pytest.raises(
        DataError, match=r"annotations\.json: image 16 .*unreadable or corrupt image"
    ):
        load_specimens(d, "coco", "grounding")
    res = load_specimens(d, "coco", "grounding", strict=False)
    problems = sorted(b.problem.split(" ")[0] for b in res.skipped)
    assert len(res.specimens) == 36 and problems == ["image", "unreadable"]


# ---- JSONL ----------------------------------------------------------------------------------


@pytest.fixture
def split(tmp_path: Path) -> Path:
    _img(tmp_path / "img" / "a.png", (64, 48))
    _img(tmp_path / "img" / "b.jpg", (100, 80), fmt="JPEG")
    return tmp_path


def test_jsonl_grounding(split: Path):
    f = _jsonl(
        split / "val.jsonl",
        [
            {
                "image": "img/a.png",
                "prompt": "red square",
                "boxes": [{"phrase": "red square", "box": [1, 2, 30, 40]}],
            },
            {
                "image": "img/b.jpg",
                "prompt": "cat",
                "boxes": [[0, 0, 100.5, 80], {"label": "cat", "bbox": [5, 5, 9, 9]}],
            },
            {"image": "img/b.jpg", "prompt": "dog", "boxes": []},
        ],
    )
    res = load_specimens(f, "auto", "grounding")
    a, cat, dog = res.specimens
    assert (a.specimen_id, a.width, a.height) == ("a.png", 64, 48)
    assert a.image_path == str(split / "img" / "a.png")
    assert a.ref_boxes == [Box(1, 2, 30, 40, "red square")]
    # an image with two prompts gets <image>#<prompt> ids; 100.5 is within 1 px and clamped
    assert (cat.specimen_id, dog.specimen_id) == ("b.jpg#cat", "b.jpg#dog")
    assert cat.ref_boxes == [Box(0, 0, 100, 80, "cat"), Box(5, 5, 9, 9, "cat")]
    assert dog.ref_boxes == []  # an explicit empty list is a negative specimen
    assert detect_format(f) == ("jsonl", f)


def test_jsonl_extra_fields_are_kept_as_metadata(split: Path, tmp_path: Path):
    from vieval_runner import store

    f = _jsonl(
        split / "val.jsonl",
        [{"id": "x1", "image": "img/a.png", "prompt": "cat", "boxes": [[1, 2, 30, 40]],
          "source": "phone", "difficulty": 3, "night": True, "tags": ["a"], "split": "val"}],
    )  # fmt: skip
    (spec,) = load_specimens(f, "auto", "grounding").specimens
    # scalar fields the adapter does not use; lists and the split filter are not metadata
    assert spec.metadata == {"source": "phone", "difficulty": 3, "night": True}
    store.create_store(str(tmp_path / "st"))
    store.write_specimens(str(tmp_path / "st"), [spec], "v1")
    stored = store.open_store(str(tmp_path / "st")).specimens().column("metadata").to_pylist()
    assert [json.loads(m) for m in stored] == [spec.metadata]


def test_coco_image_attributes_and_hf_columns_are_metadata(split: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = _coco_json()
    res = load_specimens(COCO, "auto", "grounding")
    by_file = {i["file_name"]: i for i in raw["images"]}
    for s in res.specimens[:5]:  # the image's attributes other than id, name and size
        img = by_file[Path(s.image_path).name]
        assert s.metadata == {"license": img["license"], "date_captured": img["date_captured"]}
    t = pa.table({"file": ["img/a.png"], "phrase": ["red"], "boxes": [[[1.0, 2.0, 3.0, 4.0]]],
                  "source": ["phone"], "hard": [True]})  # fmt: skip
    pq.write_table(t, split / "val.parquet")
    cols = {"image": "file", "prompt": "phrase"}
    (spec,) = load_specimens(split / "val.parquet", "hf", "grounding", columns=cols).specimens
    assert spec.metadata == {"source": "phone", "hard": True}


def test_jsonl_vqa_images_root_and_task_inference(split: Path):
    sub = split / "meta"
    sub.mkdir()
    f = _jsonl(
        sub / "qa.jsonl",
        [
            {"id": "q1", "image": "a.png", "question": "What colour?", "answers": ["red", "Red"]},
            {"id": "q2", "image": "b.jpg", "prompt": "How many?", "answer": "one", "task": "vqa"},
            {"id": "q3", "image": "b.jpg", "question": "Shape?", "answers": [{"answer": "square"}]},
        ],
    )
    res = load_specimens(f, "jsonl", None, images_root=split / "img")
    assert [(s.specimen_id, s.task, s.prompt, s.ref_answers) for s in res.specimens] == [
        ("q1", "vqa", "What colour?", ["red", "Red"]),
        ("q2", "vqa", "How many?", ["one"]),
        ("q3", "vqa", "Shape?", ["square"]),
    ]
    assert res.specimens[1].width == 100
    with pytest.raises(DataError, match=r"qa\.jsonl: line 1 .*no 'boxes'"):
        load_specimens(f, "jsonl", "grounding", images_root=split / "img")


GOOD = {"image": "img/a.png", "prompt": "thing", "boxes": [[1, 1, 10, 10]]}


def _case(**over):
    return {**GOOD, **over}


@pytest.mark.parametrize(
    "bad, problem",
    [
        (_case(image="img/missing.png"), "image file not found"),
        (_case(image="img/corrupt.png"), "unreadable or corrupt image"),
        ('{"image": "img/a.png", "prompt": ', "malformed JSON"),
        (_case(boxes=[[1, 1, 70, 10]]), "outside the 64x48 image"),
        (_case(boxes=[[20, 1, 10, 10]]), "x2 < x1"),
        ('{"image": "img/a.png", "prompt": "t", "boxes": [[1, NaN, 10, 10]]}', "NaN or infinite"),
        (
            '{"image": "img/a.png", "prompt": "t", "boxes": [[1, 1, Infinity, 10]]}',
            "NaN or infinite",
        ),
        (_case(id="x1"), "duplicate specimen id (first at line 1)"),
    ],
)
def test_jsonl_bad_rows(split: Path, bad, problem):
    (split / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    first = _case(id="x1")
    f = _jsonl(split / "val.jsonl", [first, _case(id="x2", image="img/b.jpg"), bad])
    with pytest.raises(DataError) as e:
        load_specimens(f, "jsonl", "grounding")
    msg = str(e.value)
    assert msg.startswith(f"{f}: line 3") and problem in msg, msg
    res = load_specimens(f, "jsonl", "grounding", strict=False)
    assert [s.specimen_id for s in res.specimens] == ["x1", "x2"]
    (skip,) = res.skipped
    assert (skip.file, skip.row) == (str(f), "line 3") and problem in skip.problem


def test_jsonl_split_field_and_empty(split: Path):
    rows = [_case(id="a", split="train"), _case(id="b", split="val"), _case(id="c", split="val")]
    f = _jsonl(split / "all.jsonl", rows)
    assert [
        s.specimen_id for s in load_specimens(f, "jsonl", "grounding", split="val").specimens
    ] == ["b", "c"]
    with pytest.raises(
        DataError, match=r"all\.jsonl: split 'test' is empty \(splits present: train, val\)"
    ):
        load_specimens(f, "jsonl", "grounding", split="test")
    empty = split / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_specimens(empty, "jsonl", "grounding")


def test_bad_arguments(split: Path):
    f = _jsonl(split / "v.jsonl", [GOOD])
    with pytest.raises(
        DataError, match=r"unknown data format 'csv'; allowed: auto, jsonl, coco, refcoco, hf"
    ):
        load_specimens(f, "csv", "grounding")
    assert set(FORMATS) == {"jsonl", "coco", "refcoco", "hf"}
    with pytest.raises(DataError, match="does not exist"):
        load_specimens(split / "nope.jsonl", "auto", "grounding")
    with pytest.raises(DataError, match="unknown task"):
        load_specimens(f, "jsonl", "caption")
    with pytest.raises(
        DataError, match=r"line 1: missing field 'phrase_text' \(mapped as prompt\)"
    ):
        load_specimens(f, "jsonl", "grounding", prompt_field="phrase_text")


# ---- Hugging Face datasets ------------------------------------------------------------------


@pytest.fixture
def hf_rows(split: Path) -> list[dict]:
    return [
        {
            "qid": "h1",
            "picture": {"bytes": (split / "img" / "a.png").read_bytes(), "path": "a.png"},
            "query": "colour?",
            "gold": ["red"],
        },
        {
            "qid": "h2",
            "picture": {"bytes": (split / "img" / "b.jpg").read_bytes(), "path": "b.jpg"},
            "query": "size?",
            "gold": ["big", "large"],
        },
    ]


COLS = {"id": "qid", "image": "picture", "prompt": "query", "answers": "gold"}


def test_hf_save_to_disk(split: Path, hf_rows):
    import datasets

    feats = datasets.Features(
        {
            "qid": datasets.Value("string"),
            "picture": datasets.Image(),
            "query": datasets.Value("string"),
            "gold": datasets.Sequence(datasets.Value("string")),
        }
    )
    ds = datasets.Dataset.from_list(hf_rows, features=feats)
    datasets.DatasetDict({"train": ds.select([0]), "validation": ds}).save_to_disk(
        str(split / "hfds")
    )
    res = load_specimens(split / "hfds", "auto", "vqa", columns=COLS, split="validation")
    s1, s2 = res.specimens
    assert (s1.specimen_id, s1.prompt, s1.ref_answers, s1.width, s1.height) == (
        "h1",
        "colour?",
        ["red"],
        64,
        48,
    )
    assert s2.image_bytes == hf_rows[1]["picture"]["bytes"] and s2.image_path is None
    assert s2.load_image().size == (100, 80)
    with pytest.raises(DataError, match="choose a split from the saved splits: train, validation"):
        load_specimens(split / "hfds", "hf", "vqa", columns=COLS)
    with pytest.raises(DataError) as e:
        load_specimens(
            split / "hfds", "hf", "vqa", columns={**COLS, "prompt": "question"}, split="train"
        )
    assert "column 'question' (mapped as prompt) not found" in str(e.value)
    assert "available columns: qid, picture, query, gold" in str(e.value)
    ds.select([]).save_to_disk(str(split / "empty"))
    with pytest.raises(DataError, match=r"empty.*is empty \(0 rows\)"):
        load_specimens(split / "empty", "hf", "vqa", columns=COLS)


def test_hf_parquet_grounding_with_paths(split: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table(
        {
            "file": ["img/a.png", "img/b.jpg", "img/b.jpg"],
            "phrase": ["red square", "blob", "blob"],
            "boxes": [
                [[1.0, 2.0, 3.0, 4.0]],
                [[0.0, 0.0, 50.0, 50.0], [10.0, 10.0, 20.0, 20.0]],
                [[0.0, 0.0, 200.0, 10.0]],
            ],
        }
    )
    pq.write_table(t, split / "val.parquet")
    with pytest.raises(
        DataError, match=r"no image column .*available columns: file, phrase, boxes"
    ):
        load_specimens(split / "val.parquet", "auto", "grounding")
    cols = {"image": "file", "prompt": "phrase"}
    with pytest.raises(DataError, match=r"val\.parquet: row 2: box .*outside the 100x80 image"):
        load_specimens(split / "val.parquet", "auto", "grounding", columns=cols)
    res = load_specimens(split / "val.parquet", "hf", "grounding", columns=cols, strict=False)
    a, b = res.specimens
    assert (a.specimen_id, a.image_path, a.ref_boxes) == (
        "a.png",
        str(split / "img" / "a.png"),
        [Box(1, 2, 3, 4, "red square")],
    )
    assert len(b.ref_boxes) == 2 and b.specimen_id == "b.jpg"
    assert [x.row for x in res.skipped] == ["row 2"]


# ---- RefCOCO-style --------------------------------------------------------------------------


def test_refcoco_json_and_jsonl(split: Path):
    rows = [
        {
            "ref_id": 7,
            "image": "img/b.jpg",
            "sentences": [{"sent": "left blob"}, {"raw": "the blob on the left"}],
            "bbox": [10, 20, 30, 40],
            "split": "val",
        },
        {
            "ref_id": 8,
            "image": "img/a.png",
            "expression": "red thing",
            "box": [1, 1, 5, 5],
            "split": "val",
        },
        {
            "ref_id": 9,
            "image": "img/a.png",
            "expression": "other",
            "box": [1, 1, 5, 5],
            "split": "testA",
        },
    ]
    (split / "refs.json").write_text(json.dumps(rows))
    _jsonl(split / "refs.jsonl", rows)
    for f in (split / "refs.json", split / "refs.jsonl"):
        assert detect_format(f)[0] == "refcoco"
        res = load_specimens(f, "auto", "grounding", split="val")
        assert [(s.specimen_id, s.prompt) for s in res.specimens] == [
            ("7#0", "left blob"),
            ("7#1", "the blob on the left"),
            ("8#0", "red thing"),
        ]
        assert res.specimens[0].ref_boxes == [Box(10, 20, 40, 60, "left blob")]  # xywh -> xyxy
        assert res.specimens[2].ref_boxes == [Box(1, 1, 5, 5, "red thing")]
    bad = [
        *rows[:2],
        {"ref_id": 10, "image": "img/a.png", "expression": "x", "bbox": [60, 1, 10, 5]},
    ]
    _jsonl(split / "bad.jsonl", bad)
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3 \(specimen '10'\): box .* outside"):
        load_specimens(split / "bad.jsonl", "refcoco", "grounding")


def test_refcoco_without_ids(split: Path):
    rows = [
        {"image": "img/a.png", "sentences": ["left", "left"], "box": [1, 1, 5, 5]},
        {"image": "img/b.jpg", "sentences": ["blob"], "box": [1, 1, 5, 5]},
    ]
    res = load_specimens(_jsonl(split / "r.jsonl", rows), "auto", "grounding")
    assert [s.specimen_id for s in res.specimens] == ["a.png#left", "a.png#left~2", "b.jpg"]
    assert Counter(s.specimen_id for s in res.specimens).most_common(1)[0][1] == 1
    assert not any(math.isnan(v) for s in res.specimens for v in s.ref_boxes[0].as_list())


# ---- smaller paths ---------------------------------------------------------------------------


def test_clean_category_name_rules():
    assert clean_category_name("traffic_light") == "traffic light"
    assert (
        clean_category_name("Arduino Uno WiFi-Shield") == "Arduino Uno WiFi-Shield"
    )  # spaced: kept
    assert clean_category_name("Board -LED-") == "Board (LED)"  # acronym keeps its case
    assert clean_category_name("  Jetson   TX2 ") == "Jetson TX2"


def test_coco_captions_vqa_and_roboflow_split_folder(tmp_path: Path):
    _img(tmp_path / "valid" / "x.png", (32, 32))
    coco = {
        "images": [{"id": 1, "file_name": "x.png", "width": 32, "height": 32}],
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "A red square."},
            {"id": 2, "image_id": 1, "caption": "A square."},
        ],
    }
    (tmp_path / "valid" / "_annotations.coco.json").write_text(json.dumps(coco))
    res = load_specimens(tmp_path, "auto", "vqa", split="valid")
    (s,) = res.specimens
    assert (s.specimen_id, s.task, s.prompt, s.ref_answers) == (
        "x.png",
        "vqa",
        "Describe the image.",
        ["A red square.", "A square."],
    )
    with pytest.raises(DataError, match="needs a COCO captions file"):
        load_specimens(COCO, "coco", "vqa")


def test_coco_declared_size_mismatch(tmp_path: Path):
    def edit(raw):
        raw["images"][0]["width"] = 1280

    with pytest.raises(DataError, match=r"image 4 .*declared size 1280x640 but .* is 640x640"):
        load_specimens(_coco_variant(tmp_path, edit), "coco", "grounding")


def test_hf_parquet_folder_split_by_file_name(split: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = split / "pq"
    d.mkdir()
    for name, q in (("train-00000.parquet", "t?"), ("validation-00000.parquet", "v?")):
        t = pa.table({"image": ["../img/a.png"], "question": [q], "answers": [["yes"]]})
        pq.write_table(t, d / name)
    res = load_specimens(d, "auto", "vqa", split="validation")
    assert [(s.prompt, s.ref_answers, s.width) for s in res.specimens] == [("v?", ["yes"], 64)]
    with pytest.raises(DataError, match="no file for split 'test' among train-00000.parquet"):
        load_specimens(d, "hf", "vqa", split="test")
