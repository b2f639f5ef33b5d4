"""Parsers for formats whose boxes are special tokens or tags.

``qwen2_vl``, ``internvl``, ``deepseek_vl2`` and ``kosmos2`` write ``phrase-tag ... box-tag``:
a box takes the most recent phrase (or the default label). Location-token runs (PaliGemma,
Florence-2) are in ``locations``.

Box spans (``Box.span``, raw-text positions): a box tag's boxes split the group from its
phrase tag (if no earlier box used that phrase) to its closing tag, each box ending where its
last coordinate ends (the last at the closing tag); a location run's boxes take their own
location tokens plus the label (PaliGemma: up to the ``;``; Florence-2: the text before).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from vieval_runner.parsing.common import (
    NUM,
    NUM_RE,
    Collector,
    ParseContext,
    clean_text_map,
    floats,
    remove_map,
)
from vieval_runner.records import ParseResult

Span = tuple[int, int]
#: ``on_box(content, content_start, ref, complete, group, col)``; ``group``: the box tag's span
#: (with its phrase tag when this is the first box tag after it).
BoxHandler = Callable[[str, int, str | None, bool, Span, Collector], None]


def _walk(
    text: str,
    tags: re.Pattern,
    names: tuple[str, str, str],
    on_box: BoxHandler,
    col: Collector,
    relation_tag: str | None = None,
) -> None:
    """Walk ``text`` tag by tag; call ``on_box`` for each box tag. ``names``: the phrase-open,
    box-open and box-close tag names (``tags`` group 1).

    ``complete`` is False when the text ends inside the box (cut off by ``max_new_tokens``).
    ``relation_tag`` (InternVL's scene-graph ``pred``): the two box tags right after it
    repeat the relation's subject and object, already boxed after their own phrases, so
    they are skipped rather than counted again.
    """
    ref_tag, box_tag, close_tag = names
    marks = list(tags.finditer(text))
    ref: str | None = None
    ref_start: int | None = None  # a phrase no box has used yet starts the next box's span
    repeats = 0  # box tags still to skip after a relation tag
    for i, m in enumerate(marks):
        if relation_tag is not None and m.group(1) == relation_tag:
            repeats, ref_start = 2, None
            continue
        if m.group(1) == ref_tag:
            repeats = 0
        elif m.group(1) == box_tag and repeats:
            repeats -= 1
            if i + 1 == len(marks):
                col.flags.add("truncated")  # cut inside a repeated relation box
            continue
        nxt = marks[i + 1] if i + 1 < len(marks) else None
        content_end = nxt.start() if nxt else len(text)
        content = text[m.end() : content_end]
        if m.group(1) == ref_tag:
            if nxt is None:
                col.flags.add("truncated")  # cut inside the phrase: nothing to recover
                return
            ref, ref_start = content, m.start()
        elif m.group(1) == box_tag:
            end = nxt.end() if nxt is not None and nxt.group(1) == close_tag else content_end
            group = (m.start() if ref_start is None else ref_start, end)
            ref_start = None
            on_box(content, m.end(), ref, nxt is not None, group, col)
            if nxt is None:
                col.flags.add("truncated")


def _split(ends: list[int], group: Span) -> list[Span]:
    """One span per box: consecutive pieces of ``group``, box k ending at ``ends[k]`` (the last
    at the group's end), so every character of the group belongs to exactly one box."""
    spans, start = [], group[0]
    for k, end in enumerate(ends):
        end = group[1] if k == len(ends) - 1 else max(end, start)
        spans.append((start, end))
        start = end
    return spans


_CLOSER = re.compile(r"\s*[)\]]")


def _quad_ends(content: str, offset: int) -> list[int]:
    """Where each group of four numbers in ``content`` ends, with the bracket that closes its
    last number (``offset``: content's start in the text)."""
    ends = [m.end() for m in NUM_RE.finditer(content)][3::4]
    return [(m.end() if (m := _CLOSER.match(content, e)) else e) + offset for e in ends]


def _groups_of_four(
    nums: list, col: Collector, ref, sx: float, sy: float, spans: list[Span] | None = None
) -> None:
    if not nums or len(nums) % 4:
        col.flags.add("malformed")
        return
    for k in range(0, len(nums), 4):
        x1, y1, x2, y2 = nums[k : k + 4]
        span = spans[k // 4] if spans and k // 4 < len(spans) else None
        col.add_scaled([x1, y1, x2, y2], sx, sy, ref, span)


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
    text, where = clean_text_map(text)
    col = Collector(ctx, where)
    w, h = ctx.image_size
    sx, sy = w / 1000, h / 1000

    def on_box(content: str, at: int, ref, complete: bool, group: Span, col: Collector) -> None:
        nums = floats(content)
        if complete or (nums and len(nums) % 4 == 0 and content.rstrip().endswith(")")):
            _groups_of_four(nums, col, ref, sx, sy, _split(_quad_ends(content, at), group))

    if _QWEN_TAGS.search(text):
        names = ("object_ref_start", "box_start", "box_end")
        _walk(text, _QWEN_TAGS, names, on_box, col)
    else:
        for m in _QWEN_BARE.finditer(text):
            _groups_of_four(floats(m.group(0)), col, None, sx, sy, [m.span()])
    return col.result(text)


# ---------------------------------------------------------------- internvl, deepseek_vl2
_INTERN_TAGS = re.compile(r"<(/?ref|/?box|/?pred)>")
_DEEPSEEK_TAGS = re.compile(r"<\|(/?ref|/?det)\|>")
_INNER_LIST = re.compile(r"\[([^\[\]]*)\]")
# A box list without tags, as decoding with skip_special_tokens=True leaves it: "[[x1, y1, x2,
# y2], ...]" or a bare "[x1, y1, x2, y2]", with the phrase (if any) written before it.
_STRIPPED_LIST = re.compile(
    rf"\[\s*\[[^\[\]]*\](?:\s*,\s*\[[^\[\]]*\])*\s*\]"
    rf"|\[\s*(?:{NUM})(?:\s*,\s*(?:{NUM})){{3}}\s*\]",
    re.I,
)
_STRIPPED_CUT = re.compile(r"\[[\[\d\s,.\]-]*\Z")


def _box_lists(sx: float, sy: float) -> BoxHandler:
    """A box tag holding ``[[x1, y1, x2, y2], ...]`` (or bare numbers), scaled by sx, sy."""

    def on_box(content: str, at: int, ref, complete: bool, group: Span, col: Collector) -> None:
        inner = list(_INNER_LIST.finditer(content))
        if not inner:
            if complete:
                nums = floats(content)
                _groups_of_four(nums, col, ref, sx, sy, _split(_quad_ends(content, at), group))
            return
        # an unclosed last list is not matched: recovered boxes are whole
        items = [(floats(m.group(1)), _quad_ends(m.group(0), at + m.start())) for m in inner]
        ends = [e for _, quads in items for e in quads]
        spans = iter(_split(ends, group))
        for nums, quads in items:
            mine = [next(spans) for _ in quads] if not len(nums) % 4 else None
            _groups_of_four(nums, col, ref, sx, sy, mine)

    return on_box


def _stripped(text: str, col: Collector, sx: float, sy: float) -> None:
    """``phrase[[x1, y1, x2, y2], ...]`` without tags: each list's label is the text since the
    previous list (the default label when that is blank)."""
    on_box = _box_lists(sx, sy)
    prev = 0
    for m in _STRIPPED_LIST.finditer(text):
        label = text[prev : m.start()].strip(" \t\n:,.;") or None
        on_box(m.group(0), m.start(), label, True, (prev, m.end()), col)
        prev = m.end()
    if _STRIPPED_CUT.search(text[prev:]):
        col.flags.add("truncated")


def parse_internvl(text: str, ctx: ParseContext) -> ParseResult:
    """``<ref>phrase</ref><box>[[x1, y1, x2, y2], ...]</box>``, 0-1000 relative.

    InternVL's own ``chat()`` decodes with ``skip_special_tokens=True``, so real output (and
    its RefCOCO evaluator's input) often has no tags: ``[[x1, y1, x2, y2]]`` or
    ``phrase[[...]]``; that form is read too. Scene-graph relations
    (``<pred>p</pred><box>[subject]</box><box>[object]</box>``) repeat boxes already given
    after their phrases: skipped."""
    return _tagged_or_stripped(text, ctx, _INTERN_TAGS, ("ref", "box", "/box"), 1000.0, "pred")


def _tagged_or_stripped(
    text: str,
    ctx: ParseContext,
    tags: re.Pattern,
    names: tuple[str, str, str],
    grid: float,
    relation_tag: str | None = None,
) -> ParseResult:
    """Walk the box tags; without any box tag, read tagless ``phrase[[...]]`` (phrase tags
    that survived decoding are dropped from the label)."""
    text, where = clean_text_map(text)
    w, h = ctx.image_size
    sx, sy = w / grid, h / grid
    if any(m.group(1) == names[1] for m in tags.finditer(text)):
        col = Collector(ctx, where)
        _walk(text, tags, names, _box_lists(sx, sy), col, relation_tag)
    else:
        text, where = remove_map(text, where, tags)
        col = Collector(ctx, where)
        _stripped(text, col, sx, sy)
    return col.result(text)


def parse_deepseek_vl2(text: str, ctx: ParseContext) -> ParseResult:
    """DeepSeek-VL2: ``<|ref|>phrase<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>``, each
    ``v / 999 * size`` (``deepseek_vl2/serve/app_modules/utils.py`` ``parse_ref_bbox``);
    without tags (decoded with ``skip_special_tokens=True``) read as ``phrase[[...]]``."""
    return _tagged_or_stripped(text, ctx, _DEEPSEEK_TAGS, ("ref", "det", "/det"), 999.0)


# ---------------------------------------------------------------- kosmos2
_KOSMOS_TAGS = re.compile(r"<(/?phrase|/?object)>")
_PATCH = re.compile(r"<patch_index_(\d{1,6})>")
_KOSMOS_SIDE = 32  # 1024 patch-index tokens = a 32 x 32 grid
_KOSMOS_DELIMITER = "</delimiter_of_multi_objects/>"


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
    text, where = clean_text_map(text)
    col = Collector(ctx, where)
    w, h = ctx.image_size

    def on_box(content: str, at: int, ref, complete: bool, group: Span, col: Collector) -> None:
        parts = content.split(_KOSMOS_DELIMITER)
        found, pos = [], at
        for k, part in enumerate(parts):
            idx = [int(v) for v in _PATCH.findall(part)]
            end, pos = pos + len(part), pos + len(part) + len(_KOSMOS_DELIMITER)
            if len(idx) != 2:
                if complete or k < len(parts) - 1:
                    col.flags.add("malformed")
                continue
            found.append((idx, end))
        for (idx, _), span in zip(found, _split([e for _, e in found], group), strict=True):
            x1, y1, x2, y2 = _patch_to_xyxy(idx[0], idx[1])
            col.add([x1 * w, y1 * h, x2 * w, y2 * h], ref, span)

    _walk(text, _KOSMOS_TAGS, ("phrase", "object", "/object"), on_box, col)
    return col.result(text)
