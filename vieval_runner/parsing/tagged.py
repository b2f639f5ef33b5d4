"""Parsers for formats whose boxes are special tokens or tags.

``qwen2_vl``, ``internvl`` and ``kosmos2`` write ``phrase-tag ... box-tag``: a box takes the most
recent phrase (or the default label). ``paligemma_loc`` and ``florence2_loc`` write runs of
location tokens: PaliGemma's label follows its run, Florence-2's precedes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from vieval_runner.parsing.common import NUM, Collector, ParseContext, clean_text, floats
from vieval_runner.records import ParseResult

BoxHandler = Callable[[str, str | None, bool, Collector], None]


def _walk(text: str, tags: re.Pattern, ref_tag: str, box_tag: str, on_box: BoxHandler, col):
    """Walk ``text`` tag by tag; call ``on_box(content, ref, complete, col)`` for each box tag.

    ``complete`` is False when the text ends inside the box (cut off by ``max_new_tokens``).
    """
    marks = list(tags.finditer(text))
    ref: str | None = None
    for i, m in enumerate(marks):
        nxt = marks[i + 1] if i + 1 < len(marks) else None
        content = text[m.end() : nxt.start() if nxt else len(text)]
        if m.group(1) == ref_tag:
            if nxt is None:
                col.flags.add("truncated")  # cut inside the phrase: nothing to recover
                return
            ref = content
        elif m.group(1) == box_tag:
            on_box(content, ref, nxt is not None, col)
            if nxt is None:
                col.flags.add("truncated")


def _groups_of_four(nums: list, col: Collector, ref, sx: float, sy: float) -> None:
    if not nums or len(nums) % 4:
        col.flags.add("malformed")
        return
    for k in range(0, len(nums), 4):
        x1, y1, x2, y2 = nums[k : k + 4]
        col.add([_mul(x1, sx), _mul(y1, sy), _mul(x2, sx), _mul(y2, sy)], ref)


def _mul(v: float | None, s: float) -> float | None:
    return None if v is None else v * s


# ---------------------------------------------------------------- qwen2_vl
_QWEN_TAGS = re.compile(r"<\|(object_ref_start|object_ref_end|box_start|box_end)\|>")
_QWEN_BARE = re.compile(
    rf"\(\s*({NUM})\s*,\s*({NUM})\s*\)\s*,?\s*\(\s*({NUM})\s*,\s*({NUM})\s*\)", re.I
)


def parse_qwen2_vl(text: str, ctx: ParseContext) -> ParseResult:
    """``<|object_ref_start|>p<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``, 0-1000.

    Without any Qwen tag (output decoded with ``skip_special_tokens=True``), bare
    ``(x1,y1),(x2,y2)`` pairs are read with the default label.
    """
    text = clean_text(text)
    col = Collector(ctx)
    w, h = ctx.image_size
    sx, sy = w / 1000, h / 1000

    def on_box(content: str, ref, complete: bool, col: Collector) -> None:
        nums = floats(content)
        if complete or (nums and len(nums) % 4 == 0 and content.rstrip().endswith(")")):
            _groups_of_four(nums, col, ref, sx, sy)

    if _QWEN_TAGS.search(text):
        _walk(text, _QWEN_TAGS, "object_ref_start", "box_start", on_box, col)
    else:
        for m in _QWEN_BARE.finditer(text):
            _groups_of_four(floats(m.group(0)), col, None, sx, sy)
    return col.result(text)


# ---------------------------------------------------------------- internvl
_INTERN_TAGS = re.compile(r"<(/?ref|/?box)>")
_INNER_LIST = re.compile(r"\[([^\[\]]*)\]")


def parse_internvl(text: str, ctx: ParseContext) -> ParseResult:
    """``<ref>phrase</ref><box>[[x1, y1, x2, y2], ...]</box>``, 0-1000 relative."""
    text = clean_text(text)
    col = Collector(ctx)
    w, h = ctx.image_size
    sx, sy = w / 1000, h / 1000

    def on_box(content: str, ref, complete: bool, col: Collector) -> None:
        inner = _INNER_LIST.findall(content)
        if not inner:
            if complete:
                _groups_of_four(floats(content), col, ref, sx, sy)
            return
        for item in inner:  # an unclosed last list is not matched: recovered boxes are whole
            _groups_of_four(floats(item), col, ref, sx, sy)

    _walk(text, _INTERN_TAGS, "ref", "box", on_box, col)
    return col.result(text)


# ---------------------------------------------------------------- kosmos2
_KOSMOS_TAGS = re.compile(r"<(/?phrase|/?object)>")
_PATCH = re.compile(r"<patch_index_(\d{1,6})>")
_KOSMOS_SIDE = 32  # 1024 patch-index tokens = a 32 x 32 grid


def _patch_to_xyxy(ul: int, lr: int, n: int = _KOSMOS_SIDE) -> tuple[float, float, float, float]:
    """transformers' ``processing_kosmos2.patch_index_to_coordinate`` (normalized 0-1)."""
    cell = 1.0 / n
    ulx, uly, lrx, lry = ul % n, ul // n, lr % n, lr // n
    if ul == lr or ulx == lrx or uly == lry:
        return ulx * cell, uly * cell, lrx * cell + cell, lry * cell + cell
    half = cell / 2
    return ulx * cell + half, uly * cell + half, lrx * cell + half, lry * cell + half


def parse_kosmos2(text: str, ctx: ParseContext) -> ParseResult:
    """``<phrase>p</phrase><object><patch_index_UL><patch_index_LR></object>`` on a 32x32 grid."""
    text = clean_text(text)
    col = Collector(ctx)
    w, h = ctx.image_size

    def on_box(content: str, ref, complete: bool, col: Collector) -> None:
        parts = content.split("</delimiter_of_multi_objects/>")
        for k, part in enumerate(parts):
            idx = [int(v) for v in _PATCH.findall(part)]
            if len(idx) != 2:
                if complete or k < len(parts) - 1:
                    col.flags.add("malformed")
                continue
            x1, y1, x2, y2 = _patch_to_xyxy(idx[0], idx[1])
            col.add([x1 * w, y1 * h, x2 * w, y2 * h], ref)

    _walk(text, _KOSMOS_TAGS, "phrase", "object", on_box, col)
    return col.result(text)


# ---------------------------------------------------------------- location-token runs
_SEG = re.compile(r"<seg\d+>")
_PALI_RUN = re.compile(r"(?:<loc(\d{1,6})>)+")
_FLOR_RUN = re.compile(r"(?:<loc_(\d{1,6})>)+")
_ANY_TAG = re.compile(r"<[^<>]*>")


def _run_values(run: re.Match, prefix: str) -> list[int]:
    return [int(v) for v in re.findall(prefix + r"(\d{1,6})>", run.group(0))]


def _loc_runs(text: str, run_re: re.Pattern, prefix: str, col: Collector):
    """Yield (run index, complete quads, run) for each location run; flag broken runs."""
    runs = list(run_re.finditer(text))
    for i, run in enumerate(runs):
        vals = _run_values(run, prefix)
        if len(vals) % 4:
            at_end = i == len(runs) - 1 and not text[run.end() :].strip()
            col.flags.add("truncated" if at_end else "malformed")
        quads = [vals[k : k + 4] for k in range(0, len(vals) - len(vals) % 4, 4)]
        yield i, quads, runs


def parse_paligemma_loc(text: str, ctx: ParseContext) -> ParseResult:
    """``<locY1><locX1><locY2><locX2> label ; ...``: y first, each ``bin / 1024 * size``."""
    text = clean_text(_SEG.sub("", text))
    col = Collector(ctx)
    w, h = ctx.image_size
    for i, quads, runs in _loc_runs(text, _PALI_RUN, "<loc", col):
        tail_end = runs[i + 1].start() if i + 1 < len(runs) else len(text)
        label = text[runs[i].end() : tail_end].split(";")[0]
        for y1, x1, y2, x2 in quads:
            col.add([x1 / 1024 * w, y1 / 1024 * h, x2 / 1024 * w, y2 / 1024 * h], label)
    return col.result(text)


def parse_florence2_loc(text: str, ctx: ParseContext) -> ParseResult:
    """``label<loc_x1><loc_y1><loc_x2><loc_y2>...``: 1000 bins, dequantized at bin + 0.5."""
    text = clean_text(text)
    col = Collector(ctx)
    w, h = ctx.image_size
    for i, quads, runs in _loc_runs(text, _FLOR_RUN, "<loc_", col):
        head_start = runs[i - 1].end() if i else 0
        label = _ANY_TAG.sub("", text[head_start : runs[i].start()])
        for x1, y1, x2, y2 in quads:
            col.add(
                [
                    (x1 + 0.5) * w / 1000,
                    (y1 + 0.5) * h / 1000,
                    (x2 + 0.5) * w / 1000,
                    (y2 + 0.5) * h / 1000,
                ],
                label,
            )
    return col.result(text)
