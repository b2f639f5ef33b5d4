"""Synthetic shapes dataset for the demo: coloured shapes on textured backgrounds.

Each image holds a target shape and distractors; grounding specimens ask for "the red
triangle", VQA specimens ask about colour, count or position. Deterministic given a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Placed:
    colour: str
    shape: str
    box: tuple[int, int, int, int]


def _texture(rng: random.Random, size: int) -> Image.Image:
    base = rng.randint(150, 200)
    image = Image.new("RGB", (size, size), (base, base, base - 10))
    draw = ImageDraw.Draw(image)
    for _ in range(size // 2):  # faint speckle so the background is not flat
        x, y = rng.randrange(size), rng.randrange(size)
        shade = base + rng.randint(-25, 25)
        draw.point((x, y), fill=(shade, shade, shade))
    return image


def _draw(draw: ImageDraw.ImageDraw, placed: Placed) -> None:
    x1, y1, x2, y2 = placed.box
    fill = COLOURS[placed.colour]
    if placed.shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif placed.shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)


def make_scene(
    rng: random.Random, size: int = 64, cells: int = 2
) -> tuple[Image.Image, list[Placed]]:
    """One image with 1-3 distinct shapes, each in its own grid cell (no overlaps)."""
    cell = size // cells
    slots = [(cx, cy) for cy in range(cells) for cx in range(cells)]
    rng.shuffle(slots)
    # every shape in a scene differs from the others in colour AND in kind, so a phrase names
    # exactly one shape and either word alone finds it: learnable by a tiny model in minutes
    k = rng.randint(1, min(3, len(slots)))
    kinds = list(zip(rng.sample(list(COLOURS), k), rng.sample(SHAPES, k), strict=True))
    placed = []
    for (cx, cy), (colour, shape) in zip(slots[:k], kinds, strict=True):
        margin = cell // 8
        placed.append(
            Placed(
                colour,
                shape,
                (
                    cx * cell + margin,
                    cy * cell + margin,
                    (cx + 1) * cell - margin,
                    (cy + 1) * cell - margin,
                ),
            )
        )
    image = _texture(rng, size)
    draw = ImageDraw.Draw(image)
    for p in placed:
        _draw(draw, p)
    return image, placed


def _position(p: Placed, size: int) -> str:
    x = (p.box[0] + p.box[2]) / 2
    y = (p.box[1] + p.box[3]) / 2
    return f"{'top' if y < size / 2 else 'bottom'} {'left' if x < size / 2 else 'right'}"


def scene_records(
    image_name: str, placed: list[Placed], task: str, size: int, rng: random.Random
) -> list[dict]:
    """Specimen records (JSONL rows) for one scene."""
    if task == "grounding":
        target = rng.choice(placed)
        phrase = f"the {target.colour} {target.shape}"
        return [
            {
                "id": f"{Path(image_name).stem}",
                "image": f"images/{image_name}",
                "task": "grounding",
                "prompt": phrase,
                "boxes": [{"label": phrase, "box": list(target.box)}],
            }
        ]
    target = rng.choice(placed)
    kind = rng.choice(("colour", "count", "position"))
    if kind == "colour":  # asked by position: a tiny model at 32 px tells colours apart faster
        question = f"What colour is the shape at the {_position(target, size)}?"
        answer = target.colour
    elif kind == "count":
        question, answer = "How many shapes are there?", str(len(placed))
    else:
        question, answer = f"Where is the {target.colour} {target.shape}?", _position(target, size)
    return [
        {
            "id": f"{Path(image_name).stem}",
            "image": f"images/{image_name}",
            "task": "vqa",
            "prompt": question,
            "answers": [answer],
        }
    ]


def write_split(
    folder: str | Path, n: int, task: str, seed: int = 0, size: int = 64, name: str = "val"
) -> Path:
    """Write ``n`` scenes to ``folder/images/`` and their specimens to ``folder/<name>.jsonl``."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-{name}-{task}")
    rows = []
    for i in range(n):
        image, placed = make_scene(rng, size)
        image_name = f"{name}_{i:04d}.png"
        image.save(folder / "images" / image_name)
        rows.extend(scene_records(image_name, placed, task, size, rng))
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
