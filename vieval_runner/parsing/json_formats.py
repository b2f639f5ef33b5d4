"""JSON box formats (Qwen2.5-VL, Qwen3-VL, Gemini, Moondream) and bare ``[x1, y1, x2, y2]`` lists.

Each JSON format reads only the keys whose convention it knows: Qwen's ``bbox_2d`` is
``[x1, y1, x2, y2]``, Gemini's ``box_2d`` is ``[ymin, xmin, ymax, xmax]``, Moondream's
``x_min``/``y_min``/``x_max``/``y_max`` are 0-1. A box under another format's key (or a key of
unknown convention such as ``bbox``, COCO's ``[x, y, w, h]`` elsewhere) is not guessed at: it is
skipped and the output is ``malformed``, so a wrong ``output_format`` shows instead of
scoring swapped axes as ``ok``.

Box spans (``Box.span``): the JSON object (``{"bbox_2d": [...], "label": ...}``) or bare
coordinate list a box was read from, found by walking the text's bracket structure alongside
the parsed value (where the two disagree, e.g. duplicate keys, a child takes its parent's span).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from vieval_runner.parsing.common import (
    NUM,
    Collector,
    ParseContext,
    clean_text_map,
    coords_scale,
    to_float,
)
from vieval_runner.parsing.jsonish import Span, children, json_values, unfence
from vieval_runner.records import ParseResult

_LABEL_KEYS = ("label", "name", "phrase", "category", "text")
_POINT_KEYS = ("point_2d", "point", "points")
_MAX_DEPTH = 8
_MOONDREAM_KEYS = ("x_min", "y_min", "x_max", "y_max")


@dataclass(frozen=True)
class JsonSpec:
    """What one JSON format's boxes look like.

    ``box_keys``: keys holding four numbers; ``y_first``: they are ``[ymin, xmin, ymax,
    xmax]``; ``corner_keys``: four keys (x_min, y_min, x_max, y_max) holding one number each;
    ``plain_fallback``: without any JSON, read bare ``(x1, y1, x2, y2)`` tuples."""

    box_keys: tuple[str, ...] = ()
    y_first: bool = False
    corner_keys: tuple[str, str, str, str] | None = None
    plain_fallback: bool = False


QWEN = JsonSpec(box_keys=("bbox_2d",), plain_fallback=True)
GEMINI = JsonSpec(box_keys=("box_2d",), y_first=True)
MOONDREAM = JsonSpec(corner_keys=_MOONDREAM_KEYS)
# Keys that hold a box in some convention: a format that does not own one refuses it.
_BOXISH = ("bbox_2d", "box_2d", "bbox", "box", "x_min")


def _is_box_list(v: object) -> bool:
    return (
        isinstance(v, (list, tuple))
        and len(v) == 4
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    )


def _coords(v: object) -> list[float | None] | None:
    """Four coordinates from ``[a, b, c, d]`` or ``[[a, b], [c, d]]``."""
    if (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(p, (list, tuple)) for p in v)
    ):
        v = [*v[0], *v[1]]
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        return None
    return [to_float(x) for x in v]


def _label(entry: dict) -> object:
    for key in _LABEL_KEYS:
        if entry.get(key) not in (None, ""):
            return entry[key]
    return None


def _child_spans(body: str, span: Span, n: int) -> list[Span]:
    """The ``n`` children's spans of the group at ``span``; all ``span`` if they disagree."""
    if body[span[0] : span[0] + 1] in ("[", "{"):
        found = children(body, span)
        if len(found) == n:
            return found
    return [span] * n


@functools.cache
def _foreign_keys(spec: JsonSpec) -> tuple[str, ...]:
    """The box keys of other conventions, which ``spec`` refuses."""
    owned = set(spec.box_keys) | ({"x_min"} if spec.corner_keys else set())
    return tuple(k for k in _BOXISH if k not in owned)


class _Reader:
    """Walks parsed JSON values and adds the boxes of one format to a collector."""

    def __init__(self, spec: JsonSpec, col: Collector, sx: float, sy: float, body: str) -> None:
        self.spec, self.col, self.sx, self.sy, self.body = spec, col, sx, sy, body
        self.foreign = _foreign_keys(spec)

    def add(self, nums: list[float | None], label: object, span: Span) -> None:
        if self.spec.y_first:
            nums = [nums[1], nums[0], nums[3], nums[2]]
        self.col.add_scaled(nums, self.sx, self.sy, label, span)

    def collect(self, v: object, depth: int, top: bool, span: Span) -> None:
        """Add the boxes found in one parsed value (``span``: where it stood in the body)."""
        col, spec = self.col, self.spec
        if depth > _MAX_DEPTH:
            col.flags.add("malformed")
            return
        if type(v) is dict:  # json and ast give plain dicts and lists
            key = None
            for k in spec.box_keys:
                if k in v:
                    key = k
                    break
            if spec.corner_keys and all(k in v for k in spec.corner_keys):
                self.add([to_float(v[k]) for k in spec.corner_keys], _label(v), span)
            elif key is not None:
                nums = _coords(v[key])
                if nums is None:
                    col.flags.add("malformed")
                    return
                self.add(nums, _label(v), span)
            elif any(k in v for k in self.foreign):
                col.flags.add("malformed")  # a box in a convention this format does not know
            elif any(k in v for k in _POINT_KEYS):
                return  # a point is not a box: skipped, not an error
            else:
                pairs = zip(v.values(), _child_spans(self.body, span, len(v)), strict=True)
                nested = [(x, sp) for x, sp in pairs if isinstance(x, (list, dict))]
                if not nested:
                    col.flags.add("malformed")
                for x, sp in nested:
                    self.collect(x, depth + 1, False, sp)
        elif isinstance(v, (list, tuple)):
            if _is_box_list(v):
                self.add([to_float(x) for x in v], None, span)
            elif not v:
                col.flags.add("empty")
            else:
                pairs = zip(v, _child_spans(self.body, span, len(v)), strict=True)
                inner = [(x, sp) for x, sp in pairs if isinstance(x, (list, tuple, dict))]
                if len(inner) < len(v) and not top:
                    col.flags.add("malformed")  # at top level, odd lists are prose like "[1]"
                for x, sp in inner:
                    self.collect(x, depth + 1, False, sp)


def parse_json_boxes(
    text: str, ctx: ParseContext, spec: JsonSpec, sx: float, sy: float
) -> ParseResult:
    """Every box of format ``spec`` in the JSON values of ``text``, scaled by (sx, sy)."""
    text, where = clean_text_map(text)
    body, body_where = unfence(text, where)
    col = Collector(ctx, body_where)
    values, flags = json_values(body)
    col.flags |= flags
    reader = _Reader(spec, col, sx, sy, body)
    for v, span in values:
        reader.collect(v, 0, True, span)
    if not values and not flags and spec.plain_fallback:
        col.where = where  # no JSON at all: bare "(x1, y1, x2, y2)" tuples in the text
        plain_boxes(text, col, sx, sy)
    return col.result(text)


def parse_qwen25_vl_json(text: str, ctx: ParseContext) -> ParseResult:
    """Qwen2.5-VL JSON: absolute pixels of the resized input, scaled by image/input size."""
    return parse_json_boxes(text, ctx, QWEN, *coords_scale("input_pixel", ctx))


def parse_qwen3_vl_json(text: str, ctx: ParseContext) -> ParseResult:
    """Qwen3-VL JSON: the same shape, coordinates 0-1000 relative."""
    return parse_json_boxes(text, ctx, QWEN, *coords_scale("relative_1000", ctx))


def parse_gemini_json(text: str, ctx: ParseContext) -> ParseResult:
    """Gemini-style JSON: ``[{"box_2d": [ymin, xmin, ymax, xmax], "label": ...}]``, y first,
    0-1000 relative (Gemini API docs, "Image understanding: object detection")."""
    return parse_json_boxes(text, ctx, GEMINI, *coords_scale("relative_1000", ctx))


def parse_moondream(text: str, ctx: ParseContext) -> ParseResult:
    """Moondream ``detect()`` output as JSON: ``{"objects": [{"x_min", "y_min", "x_max",
    "y_max"}]}`` (or the bare list), each 0-1 of the image size."""
    return parse_json_boxes(text, ctx, MOONDREAM, *coords_scale("normalized_1", ctx))


# ---------------------------------------------------------------- plain_xyxy
_SEP = r"\s*,\s*"
_PLAIN = re.compile(rf"[\[(]\s*({NUM}){_SEP}({NUM}){_SEP}({NUM}){_SEP}({NUM})\s*[\])]", re.I)
_PLAIN_CUT = re.compile(rf"[\[(]\s*(?:(?:{NUM}){_SEP}){{0,3}}(?:{NUM})?\s*\Z", re.I)
# Four bare comma-separated numbers, as Qwen2.5-VL writes them without JSON ("43,378,996,957
# cakes"); not part of a longer run of numbers.
_BARE = re.compile(
    rf"(?<![\w.,\[(])({NUM}){_SEP}({NUM}){_SEP}({NUM}){_SEP}({NUM})(?![\w.]|\s*,\s*\d)", re.I
)


def plain_boxes(text: str, col: Collector, sx: float, sy: float) -> None:
    """Every bracketed ``[x1, y1, x2, y2]``/``(...)``; with none, every bare ``x1,y1,x2,y2``."""
    found = list(_PLAIN.finditer(text)) or list(_BARE.finditer(text))
    for m in found:
        col.add_scaled([to_float(g) for g in m.groups()], sx, sy, None, m.span())
    if _PLAIN_CUT.search(text):
        col.flags.add("truncated")


def parse_plain_xyxy(text: str, ctx: ParseContext) -> ParseResult:
    """Every ``[x1, y1, x2, y2]`` / ``(x1, y1, x2, y2)`` (else bare ``x1,y1,x2,y2``) in the
    text, in ``ctx.coords`` units (``input_pixel``: pixels of the resized model input)."""
    text, where = clean_text_map(text)
    col = Collector(ctx, where)
    plain_boxes(text, col, *coords_scale(ctx.coords, ctx))
    if not col.boxes and re.fullmatch(r"[\s\[\](){},.]*", text) and text:
        col.flags.add("empty")  # "[]": the model says there is nothing to box
    return col.result(text)
