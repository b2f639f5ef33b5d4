"""COCO detection (or captions-with-boxes) JSON -> grounding specimens.

One specimen per (image, phrase): the phrase is the cleaned category name (or the annotation's
``caption`` when it has one) and the reference is every box of that phrase in the image
(COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``). Specimen id: ``<file_name>#<phrase>``.

Real exports have warts, handled as follows (each noted in ``LoadResult.warnings``):
- an image without annotations has no phrase to ground: skipped (``unannotated="error"``
  makes it a bad row instead);
- an exact duplicate box of the same phrase in one image is kept once;
- ``iscrowd`` annotations are skipped (crowd regions are not objects to point at);
- categories whose names clean to the same phrase are merged under it.
A bad annotation (box outside the image, negative size, NaN, unknown category or image)
makes its whole (image, phrase) specimen a bad row, because its reference would be partial.

A captions-only file (annotations with ``caption`` and no ``bbox``) loads as VQA with
``task="vqa"``: one specimen per image, the captions as reference answers, and ``prompt`` (or
"Describe the image.") as the question.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from vieval_runner.data.common import Ctx, DataError, Item, RowProblem, check_box, xywh_to_xyxy
from vieval_runner.records import Box, Specimen, scalar_fields

CAPTION_PROMPT = "Describe the image."

_PAREN_SUFFIX = re.compile(r"\s+-([A-Za-z][\w ]*)-$")  # "Uno -Green-" (Roboflow's "(Green)")
_PLUS_SUFFIX = re.compile(r"(?<=[A-Za-z0-9])-$")  # "Pi 3 B-" (Roboflow's "Pi 3 B+")


def clean_category_name(name: str) -> str:
    """A Roboflow/COCO category name as a readable grounding phrase.

    Roboflow replaces characters it does not allow with ``-``; the rules undo that:
    ``"Arduino Mega 2560 -Black-"`` -> ``"Arduino Mega 2560 (black)"`` (a parenthesised
    variant; a title-case word is lower-cased, an acronym kept); a trailing ``-`` after a
    model letter was a ``+`` (``"Raspberry Pi 3 B-"`` -> ``"Raspberry Pi 3 B+"``: the sample
    holds both "Raspberry-Pi-3-B" and "Raspberry Pi 3 B-", so dropping it would merge two
    boards); a name without spaces is a slug whose ``-``/``_`` are spaces
    (``"Raspberry-Pi-Zero-2-W"`` -> ``"Raspberry Pi Zero 2 W"``); a name with spaces keeps its
    inner hyphens ("Wi-Fi"). Whitespace is collapsed. Case is otherwise kept.
    """
    s = " ".join(name.replace("_", " ").split())
    m = _PAREN_SUFFIX.search(s)
    if m:
        word = m.group(1).strip()
        s = f"{s[: m.start()]} ({word.lower() if word.istitle() else word})"
    s = _PLUS_SUFFIX.sub("+", s)
    if " " not in s:
        s = s.replace("-", " ")
    return " ".join(s.split())


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO file (no 'images' list)")
    if not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not a COCO file (no 'annotations' list)")
    return data


def _captions_vqa(data: dict, images: dict, ctx: Ctx) -> Iterator[Item]:
    caps: dict = defaultdict(list)
    for a in data["annotations"]:
        if isinstance(a.get("caption"), str):
            caps[a.get("image_id")].append(a["caption"].strip())
    for img_id, img in images.items():
        row = f"image {img_id}"
        if not caps.get(img_id):
            ctx.warnings.append(f"{ctx.file}: {row} has no caption: skipped")
            continue
        try:
            path = ctx.resolve_image(str(img.get("file_name", "")))
            w, h = ctx.image_size(path)
        except RowProblem as e:
            yield Item(row, problem=str(e), specimen_id=str(img.get("file_name", "")))
            continue
        prompt = ctx.prompt or CAPTION_PROMPT
        spec = Specimen(
            str(img["file_name"]), "vqa", prompt, w, h, str(path), None, [], caps[img_id]
        )
        yield Item(row, spec)


def load_coco(path: Path, ctx: Ctx) -> Iterator[Item]:
    """Adapter for ``fmt="coco"``."""
    if ctx.split is not None:
        raise DataError(
            f"{path}: a COCO file holds one split; no folder {ctx.split!r} next to it to choose"
        )
    data = _load_json(path)
    images = {img.get("id"): img for img in data["images"]}
    has_boxes = any("bbox" in a for a in data["annotations"])
    if ctx.task == "vqa":
        if has_boxes or not any("caption" in a for a in data["annotations"]):
            raise DataError(f"{path}: task 'vqa' needs a COCO captions file (no boxes)")
        yield from _captions_vqa(data, images, ctx)
        return
    cats = {c.get("id"): str(c.get("name", "")) for c in data.get("categories") or []}
    clean = clean_category_name if ctx.clean_names else str.strip
    merged: dict[str, set[str]] = defaultdict(set)
    for name in cats.values():
        merged[clean(name)].add(name)
    for phrase, names in merged.items():
        if len(names) > 1:
            ctx.warnings.append(
                f"{path}: categories {sorted(names)} all read as {phrase!r}: merged"
            )

    # Group annotations per (image, phrase), keeping file order; bad ones are remembered so
    # the whole specimen is reported once.
    groups: dict[tuple, list[dict]] = defaultdict(list)
    orphans: list[Item] = []
    for a in data["annotations"]:
        row = f"annotation {a.get('id')} (image {a.get('image_id')})"
        if a.get("image_id") not in images:
            orphans.append(Item(row, problem=f"unknown image_id {a.get('image_id')!r}"))
            continue
        if a.get("iscrowd"):
            ctx.warnings.append(f"{path}: {row}: iscrowd region skipped")
            continue
        if isinstance(a.get("caption"), str) and a["caption"].strip():
            phrase = a["caption"].strip()
        elif a.get("category_id") in cats:
            phrase = clean(cats[a["category_id"]])
        else:
            orphans.append(Item(row, problem=f"unknown category_id {a.get('category_id')!r}"))
            continue
        groups[(a["image_id"], phrase)].append(a)
    yield from orphans

    annotated = {img_id for img_id, _ in groups}
    for img_id, img in images.items():
        if img_id not in annotated:
            name = img.get("file_name")
            msg = f"image {img_id} ({name}) has no annotations: no phrase to ground"
            if ctx.unannotated == "error":
                yield Item(f"image {img_id}", problem=msg, specimen_id=str(name))
            else:
                ctx.warnings.append(f"{path}: {msg}: skipped")

    for (img_id, phrase), anns in groups.items():
        img = images[img_id]
        sid = f"{img.get('file_name')}#{phrase}"
        row = f"image {img_id}"
        try:
            image = ctx.resolve_image(str(img.get("file_name", "")))
            w, h = ctx.image_size(image)
            declared = (img.get("width"), img.get("height"))
            if None not in declared and tuple(declared) != (w, h):
                raise RowProblem(
                    f"declared size {declared[0]}x{declared[1]} but {image.name} is {w}x{h}"
                )
        except RowProblem as e:
            yield Item(row, problem=str(e), specimen_id=sid)
            continue
        boxes: list[Box] = []
        seen: dict[tuple, object] = {}
        try:
            for a in anns:
                row = f"annotation {a.get('id')} (image {img_id})"
                box = check_box(xywh_to_xyxy(a.get("bbox")), w, h, label=phrase)
                key = tuple(box.as_list())
                if key in seen:
                    ctx.warnings.append(
                        f"{path}: {row}: exact duplicate of annotation {seen[key]} "
                        f"({phrase!r} {list(key)}): kept one"
                    )
                    continue
                seen[key] = a.get("id")
                boxes.append(box)
        except RowProblem as e:
            yield Item(row, problem=str(e), specimen_id=sid)
            continue
        yield Item(
            f"image {img_id}",
            Specimen(
                sid,
                "grounding",
                phrase,
                w,
                h,
                str(image),
                None,
                boxes,
                [],
                metadata=scalar_fields(img, {"id", "file_name", "width", "height"}),
            ),  # fmt: skip
        )
