"""Parsers for JSON box lists (Qwen2.5-VL, Qwen3-VL) and bare ``[x1, y1, x2, y2]`` lists.

Models wrap JSON in prose and code fences, stop mid-list at ``max_new_tokens``, write trailing
commas or single quotes. The reader takes every JSON value it can find, repairs what is cheap,
and from a cut-off list salvages each entry that closed before the cut.

Box spans (``Box.span``): the JSON object (``{"bbox_2d": [...], "label": ...}``) or bare
coordinate list a box was read from, found by walking the text's bracket structure alongside
the parsed value (where the two disagree, e.g. duplicate keys, a child takes its parent's span).
"""

from __future__ import annotations

import ast
import json
import re

from vieval_runner.parsing.common import (
    COORDS,
    NUM,
    Collector,
    ParseContext,
    clean_text_map,
    to_float,
)
from vieval_runner.records import ParseResult

_BOX_KEYS = ("bbox_2d", "bbox", "box_2d", "box")
_LABEL_KEYS = ("label", "name", "phrase", "category", "text")
_POINT_KEYS = ("point_2d", "point", "points")
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_OPEN = re.compile(r"[\[{]")
_MAX_DEPTH = 8  # salvage/recursion depth: junk like "[[[[[[" must stay linear in time
_FAIL = object()


Span = tuple[int, int]


def _unfence(text: str, where: list[int]) -> tuple[str, list[int]]:
    """The fenced blocks joined by newlines (the text if none), with raw positions."""
    blocks = list(_FENCE.finditer(text))
    if not blocks:
        return text, where
    parts, kept = [], []
    for k, m in enumerate(blocks):
        if k:
            parts.append("\n")
            kept.append(kept[-1] if kept else where[m.start(1)] if where else 0)
        parts.append(m.group(1))
        kept.extend(where[m.start(1) : m.end(1)])
    return "".join(parts), kept


def _skip_string(s: str, i: int, quote: str = '"') -> int | None:
    """Index after the string starting at ``s[i] == quote``, or None if it never closes."""
    i += 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
        elif c == quote:
            return i + 1
        else:
            i += 1
    return None


def _children(s: str, span: Span) -> list[Span]:
    """Spans of the elements (list) or values (dict) of the bracket group ``s[span]``, split
    at top-level commas; strings in double or single quotes are skipped whole."""
    start, end = span
    out: list[Span] = []
    item, value, depth, i = start + 1, None, 0, start + 1
    while i < end:
        c = s[i]
        if c in "\"'":
            j = _skip_string(s, i, c)
            i = end if j is None else j
            continue
        if c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
            if depth < 0:
                break
        elif depth == 0 and c == ":" and value is None:
            value = i + 1
        elif depth == 0 and c == ",":
            out.append(((value if s[start] == "{" and value is not None else item), i))
            item, value = i + 1, None
        i += 1
    out.append(((value if s[start] == "{" and value is not None else item), min(i, end)))
    spans = []
    for a, b in out:
        piece = s[a:b]
        a += len(piece) - len(piece.lstrip())
        b = a + len(piece.strip())
        if b > a:
            spans.append((a, b))
    return spans


def _balanced_end(s: str, start: int, limit: int) -> int | None:
    """Index after the bracket group opened at ``s[start]``, or None if it is still open."""
    depth = 0
    i = start
    while i < limit:
        c = s[i]
        if c == '"':
            j = _skip_string(s, i)
            if j is None:
                return None
            i = j
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _loads(span: str) -> object:
    """Strict JSON, then JSON without trailing commas, then a Python literal; else ``_FAIL``."""
    for attempt in (span, re.sub(r",\s*([\]}])", r"\1", span)):
        try:
            return json.loads(attempt)
        except (ValueError, RecursionError):
            pass
    try:
        return ast.literal_eval(span)  # single quotes, None/True: Qwen fine-tunes write them
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _FAIL


def _salvage(s: str, start: int, limit: int, flags: set[str], depth: int = 0) -> list:
    """Complete values inside the list opened at ``s[start]`` (not itself parseable)."""
    out: list = []
    if s[start] != "[" or depth > _MAX_DEPTH:
        return out  # a dict cut in the middle has lost part of its entry: recover nothing
    i = start + 1
    while i < limit:
        c = s[i]
        if c == '"':
            j = _skip_string(s, i)
            if j is None:
                break
            i = j
            continue
        if c in "[{":
            end = _balanced_end(s, i, limit)
            if end is None:
                out.extend(_salvage(s, i, limit, flags, depth + 1))
                break
            val = _loads(s[i:end])
            if val is not _FAIL:
                out.append((val, (i, end)))
            elif c == "[":
                out.extend(_salvage(s, i, end - 1, flags, depth + 1))
            else:
                flags.add("malformed")
            i = end
            continue
        i += 1
    return out


def json_values(body: str) -> tuple[list[tuple[object, Span]], set[str]]:
    """Every top-level JSON value in ``body`` with its span (prose between them is skipped),
    and flags."""
    decoder = json.JSONDecoder()
    values: list = []
    flags: set[str] = set()
    pos = 0
    while m := _OPEN.search(body, pos):
        start = m.start()
        try:
            val, pos = decoder.raw_decode(body, start)
            values.append((val, (start, pos)))
            continue
        except (ValueError, RecursionError):
            pass
        end = _balanced_end(body, start, len(body))
        if end is None:  # the output stops inside this value: keep what closed before the cut
            values.extend(_salvage(body, start, len(body), flags))
            flags.add("truncated")
            break
        val = _loads(body[start:end])
        if val is not _FAIL:
            values.append((val, (start, end)))
        else:
            values.extend(_salvage(body, start, end - 1, flags))
        pos = end
    return values, flags


def _is_box_list(v: object) -> bool:
    return (
        isinstance(v, (list, tuple))
        and len(v) == 4
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    )


def _coords(v: object) -> list[float | None] | None:
    """Four coordinates from ``[x1, y1, x2, y2]`` or ``[[x1, y1], [x2, y2]]``."""
    if (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(p, (list, tuple)) for p in v)
    ):
        v = [*v[0], *v[1]]
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        return None
    return [to_float(x) for x in v]


def _scale(xyxy: list[float | None], sx: float, sy: float) -> list[float | None]:
    return [None if c is None else c * s for c, s in zip(xyxy, (sx, sy, sx, sy), strict=True)]


def _label(entry: dict) -> object:
    for key in _LABEL_KEYS:
        if entry.get(key) not in (None, ""):
            return entry[key]
    return None


def _child_spans(body: str, span: Span, n: int) -> list[Span]:
    """The ``n`` children's spans of the group at ``span``; all ``span`` if they disagree."""
    if body[span[0] : span[0] + 1] in ("[", "{"):
        children = _children(body, span)
        if len(children) == n:
            return children
    return [span] * n


def _collect(
    v: object,
    col: Collector,
    sx: float,
    sy: float,
    depth: int,
    top: bool,
    body: str = "",
    span: Span = (0, 0),
) -> None:
    """Add the boxes found in one parsed JSON value (``span``: where it stood in ``body``)."""
    if depth > _MAX_DEPTH:
        col.flags.add("malformed")
        return
    if isinstance(v, dict):
        key = next((k for k in _BOX_KEYS if k in v), None)
        if key is not None:
            xyxy = _coords(v[key])
            if xyxy is None:
                col.flags.add("malformed")
                return
            col.add(_scale(xyxy, sx, sy), _label(v), span)
        elif any(k in v for k in _POINT_KEYS):
            return  # a point is not a box: skipped, not an error
        else:
            pairs = zip(v.values(), _child_spans(body, span, len(v)), strict=True)
            nested = [(x, sp) for x, sp in pairs if isinstance(x, (list, dict))]
            if not nested:
                col.flags.add("malformed")
            for x, sp in nested:
                _collect(x, col, sx, sy, depth + 1, False, body, sp)
    elif isinstance(v, (list, tuple)):
        if _is_box_list(v):
            col.add(_scale([to_float(x) for x in v], sx, sy), None, span)
        elif not v:
            col.flags.add("empty")
        else:
            pairs = zip(v, _child_spans(body, span, len(v)), strict=True)
            inner = [(x, sp) for x, sp in pairs if isinstance(x, (list, tuple, dict))]
            if len(inner) < len(v) and not top:
                col.flags.add("malformed")  # at top level, odd lists are prose like "[1]"
            for x, sp in inner:
                _collect(x, col, sx, sy, depth + 1, False, body, sp)


def _parse_json(text: str, ctx: ParseContext, sx: float, sy: float) -> ParseResult:
    text, where = clean_text_map(text)
    body, body_where = _unfence(text, where)
    col = Collector(ctx, body_where)
    values, flags = json_values(body)
    col.flags |= flags
    for v, span in values:
        _collect(v, col, sx, sy, 0, True, body, span)
    if not values and not flags:
        col.where = where  # no JSON at all: bare "(x1, y1, x2, y2)" tuples in the text
        _plain_boxes(text, col, sx, sy)
    return col.result(text)


def parse_qwen25_vl_json(text: str, ctx: ParseContext) -> ParseResult:
    """Qwen2.5-VL JSON: absolute pixels of the resized input, scaled by image/input size."""
    w, h = ctx.image_size
    iw, ih = ctx.input_size or ctx.image_size
    return _parse_json(text, ctx, w / iw, h / ih)


def parse_qwen3_vl_json(text: str, ctx: ParseContext) -> ParseResult:
    """Qwen3-VL JSON: the same shape, coordinates 0-1000 relative."""
    w, h = ctx.image_size
    return _parse_json(text, ctx, w / 1000, h / 1000)


# ---------------------------------------------------------------- plain_xyxy
_SEP = r"\s*,\s*"
_PLAIN = re.compile(rf"[\[(]\s*({NUM}){_SEP}({NUM}){_SEP}({NUM}){_SEP}({NUM})\s*[\])]", re.I)
_PLAIN_CUT = re.compile(rf"[\[(]\s*(?:(?:{NUM}){_SEP}){{0,3}}(?:{NUM})?\s*\Z", re.I)


def _plain_boxes(text: str, col: Collector, sx: float, sy: float) -> None:
    for m in _PLAIN.finditer(text):
        col.add(_scale([to_float(g) for g in m.groups()], sx, sy), None, m.span())
    if _PLAIN_CUT.search(text):
        col.flags.add("truncated")


def parse_plain_xyxy(text: str, ctx: ParseContext) -> ParseResult:
    """Every ``[x1, y1, x2, y2]`` / ``(x1, y1, x2, y2)`` in the text, in ``ctx.coords`` units."""
    text, where = clean_text_map(text)
    col = Collector(ctx, where)
    div = COORDS[ctx.coords or "pixel"]
    w, h = ctx.image_size
    sx, sy = (1.0, 1.0) if div is None else (w / div, h / div)
    _plain_boxes(text, col, sx, sy)
    if not col.boxes and re.fullmatch(r"[\s\[\](){},.]*", text) and text:
        col.flags.add("empty")  # "[]": the model says there is nothing to box
    return col.result(text)
