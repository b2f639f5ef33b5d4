"""The demo's synthetic shapes splits: deterministic, unambiguous, boxes inside the image."""

from __future__ import annotations

import json

from PIL import Image

from vieval_runner.demo import shapes


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_is_deterministic_and_seeded(tmp_path):
    a = shapes.write_split(tmp_path / "a", n=20, task="grounding", seed=5)
    b = shapes.write_split(tmp_path / "b", n=20, task="grounding", seed=5)
    c = shapes.write_split(tmp_path / "c", n=20, task="grounding", seed=6)
    assert _rows(a) == _rows(b) != _rows(c)
    for row in _rows(a):
        img_a = (tmp_path / "a" / row["image"]).read_bytes()
        assert img_a == (tmp_path / "b" / row["image"]).read_bytes()


def test_scenes_name_exactly_one_shape(tmp_path):
    import random

    rng = random.Random(0)
    counts = set()
    for _ in range(200):
        image, placed = shapes.make_scene(rng, 64)
        assert image.size == (64, 64)
        counts.add(len(placed))
        assert len({p.colour for p in placed}) == len(placed)  # colour alone is unambiguous
        assert len({p.shape for p in placed}) == len(placed)
        for p in placed:
            x1, y1, x2, y2 = p.box
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            # the shape's colour is really drawn at its box centre
            assert image.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == shapes.COLOURS[p.colour]
    assert counts == {1, 2, 3}


def test_grounding_rows_reference_the_named_shape(tmp_path):
    path = shapes.write_split(tmp_path, n=30, task="grounding", seed=1, name="val")
    for row in _rows(path):
        (ref,) = row["boxes"]
        assert ref["label"] == row["prompt"] and row["prompt"].startswith("the ")
        colour = row["prompt"].split()[1]
        x1, y1, x2, y2 = ref["box"]
        with Image.open(tmp_path / row["image"]) as img:
            centre = img.convert("RGB").getpixel(((x1 + x2) // 2, (y1 + y2) // 2))
        assert centre == shapes.COLOURS[colour]


def test_vqa_rows_cover_colour_count_and_position(tmp_path):
    path = shapes.write_split(tmp_path, n=60, task="vqa", seed=2)
    kinds = set()
    for row in _rows(path):
        (answer,) = row["answers"]
        if row["prompt"].startswith("How many"):
            kinds.add("count")
            assert answer in {"1", "2", "3"}
        elif row["prompt"].startswith("What colour"):
            kinds.add("colour")
            assert answer in shapes.COLOURS
        else:
            kinds.add("position")
            assert answer in {"top left", "top right", "bottom left", "bottom right"}
    assert kinds == {"count", "colour", "position"}
