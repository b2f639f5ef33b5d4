"""RefCOCO-style referring expressions: one grounding specimen per expression, one box each.

Row shape (a JSONL line or an item of a JSON array)::

    {"image" [file_name, image_path]: path, "ref_id" [id, ann_id]?: id, "split"?: str,
     "sentences": [str | {"sent" | "raw": str}, ...] | "expression" [expressions]: str | [str],
     "bbox": [x, y, w, h]  (COCO/RefCOCO convention)  |  "box": [x1, y1, x2, y2]}

Specimen id: ``<ref_id>#<k>`` (k = the expression's 0-based index in the row); without an id
it is derived from the image file name (see `load_specimens`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from vieval_runner.data.common import Ctx, Item, RowProblem, check_box, first_key, xywh_to_xyxy
from vieval_runner.data.jsonl import IMAGE_KEYS, read_rows
from vieval_runner.records import Specimen

SENTENCE_KEYS = ("sentences", "expressions", "expression")
ID_KEYS = ("ref_id", "id", "ann_id")


def _sentences(row: dict) -> list[str]:
    key = first_key(row, SENTENCE_KEYS)
    if key is None:
        raise RowProblem(f"no referring expression (expected one of {', '.join(SENTENCE_KEYS)})")
    value = row[key]
    items = value if isinstance(value, list) else [value]
    out = []
    for s in items:
        if isinstance(s, dict):
            s = s.get("sent", s.get("raw"))
        if not isinstance(s, str) or not s.strip():
            raise RowProblem(f"referring expression must be non-empty text, got {s!r}")
        out.append(s.strip())
    if not out:
        raise RowProblem(f"{key!r} is empty")
    return out


def is_refcoco_row(row: object) -> bool:
    """True when a JSON object looks like a referring-expression row (for fmt='auto')."""
    return isinstance(row, dict) and first_key(row, SENTENCE_KEYS) is not None


def load_refcoco(path: Path, ctx: Ctx) -> Iterator[Item]:
    """Adapter for ``fmt="refcoco"``."""
    for label, row in read_rows(path, ctx.split):
        if isinstance(row, str):
            yield Item(label, problem=row)
            continue
        id_key = first_key(row, ID_KEYS)
        base = str(row[id_key]) if id_key and row[id_key] is not None else ""
        try:
            if ctx.task not in (None, "grounding"):
                raise RowProblem(f"referring expressions are grounding data, not {ctx.task!r}")
            image_key = ctx.columns.get("image") or first_key(row, IMAGE_KEYS)
            if image_key is None or not isinstance(row.get(image_key), str):
                raise RowProblem(f"no image path (expected one of {', '.join(IMAGE_KEYS)})")
            sentences = _sentences(row)
            if "box" in row:
                coords = row["box"]
            elif "bbox" in row:
                coords = xywh_to_xyxy(row["bbox"])
            else:
                raise RowProblem("no box ('bbox' as [x, y, w, h] or 'box' as [x1, y1, x2, y2])")
            image = ctx.resolve_image(row[image_key])
            width, height = ctx.image_size(image)
            box = check_box(coords, width, height)
        except RowProblem as e:
            yield Item(label, problem=str(e), specimen_id=base)
            continue
        for k, sentence in enumerate(sentences):
            spec = Specimen(
                specimen_id=f"{base}#{k}" if base else Path(row[image_key]).name,
                task="grounding",
                prompt=sentence,
                width=width,
                height=height,
                image_path=str(image),
                ref_boxes=[check_box(box.as_list(), width, height, label=sentence)],
            )
            yield Item(label, spec, explicit_id=bool(base))
