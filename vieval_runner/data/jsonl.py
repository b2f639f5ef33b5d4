"""JSONL adapter: one specimen per line (a JSON array of the same objects is accepted too).

Line shape (keys in brackets are alternatives; ``columns`` can rename any of them)::

    {"id"?: str, "image" [image_path, file_name]: path, "task"?: "grounding" | "vqa",
     "prompt" [phrase, question]: str, "split"?: str,
     "boxes": [{"phrase" | "label": str, "box" [bbox]: [x1, y1, x2, y2]} | [x1, y1, x2, y2]]
     | "answers": [str, ...] | "answer": str}

Image paths are relative to ``images_root`` or the JSONL file's folder; boxes are original-image
pixels. Without an ``id`` the specimen id is the image file name (see `load_specimens` for
images that carry several prompts).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vieval_runner.data.common import (
    Ctx,
    DataError,
    Item,
    RowProblem,
    answers_of,
    check_box,
    first_key,
)
from vieval_runner.records import Specimen, scalar_fields

IMAGE_KEYS = ("image", "image_path", "file_name")
PROMPT_KEYS = ("prompt", "phrase", "question")
ANSWER_KEYS = ("answers", "answer")


def read_rows(path: Path, split: str | None) -> Iterator[tuple[str, dict | str]]:
    """``(row label, object)`` per line, or ``(row label, problem)`` for a malformed line.

    With ``split``, rows whose ``split`` field differs are dropped; a file whose rows carry no
    ``split`` field at all is taken as the split itself. An empty result is a `DataError`.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows: list[tuple[str, dict | str]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: malformed JSON ({e})") from e
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
        for i, obj in enumerate(data, 1):
            rows.append((f"item {i}", obj if isinstance(obj, dict) else "not a JSON object"))
    else:
        with path.open(encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    rows.append((f"line {i}", f"malformed JSON ({e})"))
                    continue
                rows.append((f"line {i}", obj if isinstance(obj, dict) else "not a JSON object"))
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    if split is not None:
        splits = {r.get("split") for _, r in rows if isinstance(r, dict) and "split" in r}
        if splits:
            rows = [
                (lab, r) for lab, r in rows if not isinstance(r, dict) or r.get("split") == split
            ]
            if not any(isinstance(r, dict) for _, r in rows):
                raise DataError(
                    f"{path}: split {split!r} is empty (splits present: "
                    f"{', '.join(sorted(map(str, splits)))})"
                )
    yield from rows


def _task(row: dict, ctx: Ctx, boxes_key: str, answers_key: str | None) -> str:
    row_task = row.get("task")
    if row_task is not None and row_task not in ("grounding", "vqa"):
        raise RowProblem(f"unknown task {row_task!r} (allowed: grounding, vqa)")
    if ctx.task and row_task and row_task != ctx.task:
        raise RowProblem(f"row task {row_task!r} differs from the configured task {ctx.task!r}")
    task = ctx.task or row_task
    if task is None:
        if boxes_key in row:
            return "grounding"
        if answers_key is not None:
            return "vqa"
        raise RowProblem("cannot tell the task: the row has neither boxes nor answers")
    return task


def parse_boxes(value, width: int, height: int, default_label: str):
    """Reference boxes from a list of ``{"phrase"|"label", "box"|"bbox"}`` or bare 4-lists."""
    if not isinstance(value, list):
        raise RowProblem(f"boxes must be a list, got {value!r}")
    out = []
    for b in value:
        if isinstance(b, dict):
            label = b.get("phrase", b.get("label")) or default_label
            coords = b.get("box", b.get("bbox"))
            if coords is None:
                raise RowProblem(f"box entry has no 'box': {b!r}")
        else:
            label, coords = default_label, b
        out.append(check_box(coords, width, height, label=str(label)))
    return out


def row_specimen(row: dict, ctx: Ctx) -> tuple[Specimen, bool]:
    """A validated specimen from one row, and whether its id was given (not derived)."""
    cols = ctx.columns

    def key(name: str, defaults: tuple[str, ...]) -> str | None:
        if name in cols:
            if cols[name] not in row:
                raise RowProblem(
                    f"missing field {cols[name]!r} (mapped as {name}); fields: {', '.join(row)}"
                )
            return cols[name]
        return first_key(row, defaults)

    image_key = key("image", IMAGE_KEYS)
    if image_key is None or not isinstance(row[image_key], str) or not row[image_key]:
        raise RowProblem(f"no image path (expected one of {', '.join(IMAGE_KEYS)})")
    boxes_key = key("boxes", ("boxes",)) or "boxes"
    answers_key = key("answers", ANSWER_KEYS)
    task = _task(row, ctx, boxes_key, answers_key)
    prompt_key = key("prompt", PROMPT_KEYS)
    prompt = row[prompt_key] if prompt_key else ctx.prompt
    if prompt is not None and not isinstance(prompt, str):
        raise RowProblem(f"prompt must be text, got {prompt!r}")

    image = ctx.resolve_image(row[image_key])
    width, height = ctx.image_size(image)
    boxes, answers = [], []
    if task == "grounding":
        if boxes_key not in row:
            raise RowProblem(f"grounding row has no {boxes_key!r} field")
        boxes = parse_boxes(row[boxes_key], width, height, prompt or "")
        if not prompt:
            labels = {b.label for b in boxes if b.label}
            if len(labels) != 1:
                raise RowProblem("no prompt, and the boxes do not share one phrase to use")
            prompt = labels.pop()
    else:
        answers = answers_of(row.get(answers_key)) if answers_key else []
        if not answers:
            raise RowProblem(f"vqa row has no reference answer ({' / '.join(ANSWER_KEYS)})")
        if not prompt:
            raise RowProblem(f"vqa row has no question ({' / '.join(PROMPT_KEYS)})")

    id_key = key("id", ("id", "specimen_id"))
    explicit = id_key is not None and row[id_key] not in (None, "")
    sid = str(row[id_key]) if explicit else Path(row[image_key]).name
    spec = Specimen(
        specimen_id=sid,
        task=task,  # type: ignore[arg-type]
        prompt=prompt,
        width=width,
        height=height,
        image_path=str(image),
        ref_boxes=boxes,
        ref_answers=answers,
        metadata=scalar_fields(
            row, {image_key, boxes_key, answers_key, prompt_key, id_key, "task", "split"}
        ),
    )
    return spec, explicit


def load_jsonl(path: Path, ctx: Ctx) -> Iterator[Item]:
    """Adapter for ``fmt="jsonl"``."""
    for label, row in read_rows(path, ctx.split):
        if isinstance(row, str):
            yield Item(label, problem=row)
            continue
        try:
            spec, explicit = row_specimen(row, ctx)
        except RowProblem as e:
            sid = row.get(ctx.columns.get("id", "id"), "")
            yield Item(label, problem=str(e), specimen_id=str(sid or ""))
            continue
        yield Item(label, spec, explicit_id=explicit)
