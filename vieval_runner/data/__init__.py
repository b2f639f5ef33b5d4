"""Validation data -> `Specimen` records, through one adapter per input format.

``load_specimens(path, fmt, task)`` returns every specimen of the split (in file order), the
rows skipped with ``strict=False``, notes about repaired warts, and a content version.
Adapters live in `FORMATS` (a plain dict): ``jsonl``, ``coco``, ``refcoco``, ``hf``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from vieval_runner.data.coco import clean_category_name, load_coco
from vieval_runner.data.common import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadRow,
    Ctx,
    DataError,
    Item,
    LoadResult,
    allow_image_pixels,
)
from vieval_runner.data.hf import is_hf_path, load_hf
from vieval_runner.data.jsonl import load_jsonl
from vieval_runner.data.refcoco import is_refcoco_row, load_refcoco
from vieval_runner.records import TASKS, Specimen

__all__ = [
    "FORMATS",
    "BadRow",
    "DataError",
    "LoadResult",
    "clean_category_name",
    "dataset_version",
    "detect_format",
    "load_specimens",
]

FORMATS: dict[str, Callable[[Path, Ctx], Iterable[Item]]] = {
    "jsonl": load_jsonl,
    "coco": load_coco,
    "refcoco": load_refcoco,
    "hf": load_hf,
}
_COCO_NAMES = ("_annotations.coco.json", "annotations.json", "instances.json")


def _first_json_row(path: Path) -> object:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except ValueError:
                    return None
    return None


def detect_format(path: str | Path) -> tuple[str, Path]:
    """``(fmt, file)`` for ``fmt="auto"``: the adapter a path needs and the file it reads.

    A folder is an HF dataset (save_to_disk markers or Parquet/Arrow files) or holds a COCO
    file (``_annotations.coco.json`` / ``annotations.json`` / ``instances.json``); ``.jsonl``
    is JSONL unless its first row has referring expressions; ``.json`` is COCO when it has
    ``images`` + ``annotations``, else an array of JSONL-shaped or RefCOCO-style rows.
    """
    path = Path(path)
    if is_hf_path(path):
        return "hf", path
    if path.is_dir():
        for name in _COCO_NAMES:
            if (path / name).is_file():
                return "coco", path / name
        raise DataError(
            f"{path}: cannot detect the data format (no HF dataset, Parquet/Arrow files or "
            f"COCO {' / '.join(_COCO_NAMES)}); set data.format"
        )
    if path.suffix == ".jsonl":
        return ("refcoco" if is_refcoco_row(_first_json_row(path)) else "jsonl"), path
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: malformed JSON ({e})") from e
        if isinstance(data, dict) and "images" in data and "annotations" in data:
            return "coco", path
        if isinstance(data, list) and data:
            return ("refcoco" if is_refcoco_row(data[0]) else "jsonl"), path
    raise DataError(f"{path}: cannot detect the data format; set it to one of {', '.join(FORMATS)}")


def dataset_version(specimens: list[Specimen]) -> str:
    """A stable content hash (blake2b-256 hex) of the specimens, in order.

    Covers ids, task, prompt, size, reference boxes and answers, and the image *bytes*
    (file content or embedded bytes), not paths or mtimes: a copied or moved dataset keeps
    its version, any edited image or label changes it. Reading every image once costs about
    a second per GB.
    """
    h = hashlib.blake2b(digest_size=32)
    digests: dict[str, str] = {}
    for s in specimens:
        if s.image_bytes is not None:
            img = hashlib.blake2b(s.image_bytes, digest_size=16).hexdigest()
        else:
            key = str(s.image_path)
            if key not in digests:
                with open(key, "rb") as f:
                    digests[key] = hashlib.file_digest(f, "blake2b").hexdigest()[:32]
            img = digests[key]
        record = [
            s.specimen_id,
            s.task,
            s.prompt,
            s.width,
            s.height,
            [[*b.as_list(), b.label] for b in s.ref_boxes],
            s.ref_answers,
            img,
        ]
        h.update(json.dumps(record, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _derive_ids(items: list[Item]) -> list[str]:
    """Ids of derived-id specimens made unique: ``<image>`` alone when the image has one
    prompt, ``<image>#<prompt>`` when it has several, then ``~2``, ``~3`` in file order."""
    specs = [it.specimen for it in items]
    counts = Counter(
        s.specimen_id for s, it in zip(specs, items, strict=True) if not it.explicit_id
    )
    notes = []
    for s, it in zip(specs, items, strict=True):
        if not it.explicit_id and counts[s.specimen_id] > 1:
            s.specimen_id = f"{s.specimen_id}#{s.prompt}"
    seen: Counter = Counter()
    for s, it in zip(specs, items, strict=True):
        if it.explicit_id:
            continue
        seen[s.specimen_id] += 1
        if seen[s.specimen_id] > 1:
            notes.append(f"{it.row}: derived id {s.specimen_id!r} repeats; made unique")
            s.specimen_id = f"{s.specimen_id}~{seen[s.specimen_id]}"
    return notes


def load_specimens(
    path: str | Path,
    fmt: str = "auto",
    task: str | None = None,
    *,
    strict: bool = True,
    images_root: str | Path | None = None,
    columns: dict[str, str] | None = None,
    prompt_field: str | None = None,
    prompt: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    unannotated: str = "skip",
    clean_names: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> LoadResult:
    """Load a validation split as specimens.

    ``task``: ``grounding`` | ``vqa`` | None (per row, from its ``task`` field or its content).
    ``columns``: role -> field/column name (roles: image, prompt, answers, boxes, id);
    ``prompt_field`` is shorthand for ``columns["prompt"]``; ``prompt`` is a fixed prompt for
    rows without one (captions, HF datasets without a question column). ``split``: a
    ``<path>/<split>`` subfolder, an HF split, or the rows' ``split`` field. ``limit``: first N
    specimens. COCO options: ``unannotated`` (``skip`` | ``error``), ``clean_names``.
    ``max_image_pixels``: an image with more pixels (read from its header, before any pixel
    is decoded) is a bad row; PIL may open images up to it from then on.

    With ``strict`` a bad row raises `DataError` naming the file, the row and the problem;
    without, it is listed in ``skipped``. Explicit ids that repeat are bad rows; ids derived
    from image names are made unique (see `_derive_ids`).
    """
    path = Path(path)
    if task is not None and task not in TASKS:
        raise DataError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if unannotated not in ("skip", "error"):
        raise DataError(f"unannotated must be 'skip' or 'error', got {unannotated!r}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; allowed: auto, {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"{path}: data path does not exist")
    if split is not None and path.is_dir() and (path / split).is_dir():
        path, split = path / split, None  # Roboflow-style train/valid/test folders
    if fmt == "auto" or fmt == "coco" and path.is_dir():
        fmt, path = detect_format(path)
    cols = dict(columns or {})
    if prompt_field:
        cols["prompt"] = prompt_field
    ctx = Ctx(
        file=path,
        task=task,
        images_root=Path(images_root) if images_root is not None else None,
        columns=cols,
        prompt=prompt,
        split=split,
        unannotated=unannotated,
        clean_names=clean_names,
        max_pixels=max_image_pixels,
    )
    allow_image_pixels(max_image_pixels)

    good: list[Item] = []
    skipped: list[BadRow] = []

    def reject(bad: BadRow) -> None:
        if strict:
            raise DataError(bad.message())
        skipped.append(bad)

    for item in FORMATS[fmt](path, ctx):
        if item.specimen is None:
            reject(BadRow(str(path), item.row, item.specimen_id, item.problem))
        else:
            good.append(item)

    ctx.warnings.extend(_derive_ids(good))
    first_row: dict[str, str] = {}
    specimens: list[Specimen] = []
    for item in good:
        sid = item.specimen.specimen_id
        if sid in first_row:
            reject(
                BadRow(
                    str(path), item.row, sid, f"duplicate specimen id (first at {first_row[sid]})"
                )
            )
            continue
        first_row[sid] = item.row
        specimens.append(item.specimen)

    if not specimens:
        why = f"; {len(skipped)} bad row(s), first: {skipped[0].message()}" if skipped else ""
        raise DataError(f"{path}: no usable specimens{why}")
    if limit is not None:
        specimens = specimens[:limit]
    return LoadResult(specimens, skipped, dataset_version(specimens), ctx.warnings)
