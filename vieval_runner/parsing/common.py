"""Shared pieces of the parsers: the context, residue stripping, numbers, and box collection.

Pure Python on purpose: ``vieval parse --jsonl`` must start without importing model libraries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from vieval_runner.records import Box, ParseResult

#: ``plain_xyxy`` coordinate systems -> the divisor of the numbers relative to W, H (None:
#: pixels). ``pixel``: absolute original-image pixels; ``input_pixel``: pixels of the resized
#: model input (Qwen2.5-VL), scaled by ``image_size / input_size``; ``relative_1000``: 0-1000
#: of the image size; ``relative_1024``: 0-1024; ``normalized_1``: 0-1; ``percent``: 0-100.
COORDS: dict[str, float | None] = {
    "pixel": None,
    "input_pixel": None,
    "relative_1000": 1000.0,
    "relative_1024": 1024.0,
    "normalized_1": 1.0,
    "percent": 100.0,
}

# A number as models write it, including the non-finite spellings that Python's float() reads.
NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?<![A-Za-z])(?:nan|inf(?:inity)?)(?![A-Za-z])"
NUM_RE = re.compile(NUM, re.IGNORECASE)

# End-of-turn / end-of-sequence tokens of the supported families: the answer stops at the first.
END_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<end_of_utterance>",
    "<eos>",
    "</s>",
)
_END_RE = re.compile("|".join(re.escape(t) for t in END_TOKENS))
# Residue that can precede the answer: BOS, padding, a role header, Florence-2's "</s><s>" start.
_LEAD_RE = re.compile(
    r"\A(?:\s+|<s>|<bos>|<pad>|<\|begin_of_text\|>|</s><s>|<\|im_start\|>(?:assistant)?"
    r"|<start_of_turn>(?:model)?|<\|start_header_id\|>assistant<\|end_header_id\|>"
    r"|<\|assistant\|>)+"
)
_PAD_RE = re.compile(r"<pad>|<\|pad\|>|<unk>")


def clean_text(text: str) -> str:
    """Drop leading BOS/role/padding residue, cut at the first end-of-turn token, strip."""
    return clean_text_map(text)[0]


# A cleaned text plus, for each of its characters, the index of that character in the raw
# text: parsers report box spans in raw-text positions, whatever they removed before reading.
Mapped = tuple[str, Sequence[int]]


def remove_map(text: str, where: Sequence[int], pattern: re.Pattern) -> Mapped:
    """``pattern.sub("", text)`` that also drops the removed characters from ``where``."""
    parts: list[str] = []
    kept: list[int] = []
    pos = 0
    for m in pattern.finditer(text):
        parts.append(text[pos : m.start()])
        kept.extend(where[pos : m.start()])
        pos = m.end()
    if not parts:
        return text, where
    parts.append(text[pos:])
    kept.extend(where[pos:])
    return "".join(parts), kept


def clean_text_map(text: str, where: Sequence[int] | None = None) -> Mapped:
    """``clean_text`` and the raw index of each kept character (``where``: of ``text``'s)."""
    where = range(len(text)) if where is None else where  # a range slices and indexes alike
    text, where = remove_map(text, where, _PAD_RE)
    m = _LEAD_RE.match(text)
    if m:
        text, where = text[m.end() :], where[m.end() :]
    m = _END_RE.search(text)
    if m:
        text, where = text[: m.start()], where[: m.start()]
    stripped = text.lstrip()
    start = len(text) - len(stripped)
    stripped = stripped.rstrip()
    return stripped, where[start : start + len(stripped)]


def raw_span(where: Sequence[int], start: int, end: int) -> tuple[int, int] | None:
    """Span ``[start, end)`` of a mapped text as a span of the raw text (None if empty)."""
    start, end = max(start, 0), min(end, len(where))
    if end <= start:
        return None
    return where[start], where[end - 1] + 1


def to_float(value: object) -> float | None:
    """A coordinate as float (``inf`` for overflowing ints), or None if it is not a number."""
    kind = type(value)
    if kind is float:
        return value  # type: ignore[return-value]
    if kind is int:
        try:
            return float(value)  # type: ignore[arg-type]
        except OverflowError:
            return math.inf if value > 0 else -math.inf  # type: ignore[operator]
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return to_float(int(value))
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


_PLAIN_NUMBERS = (int, float)
_BIG = 2.0**53  # below it an int is exactly a float


def _check_size(name: str, size: object) -> tuple[float, float]:
    if type(size) is tuple and len(size) == 2:  # the usual (W, H) of positive numbers
        w, h = size
        if (
            type(w) in _PLAIN_NUMBERS
            and type(h) in _PLAIN_NUMBERS
            and 0 < w < _BIG
            and 0 < h < _BIG
        ):
            return size
    ok = isinstance(size, (tuple, list)) and len(size) == 2
    if ok:
        vals = [to_float(v) for v in size]
        ok = all(v is not None and math.isfinite(v) and v > 0 for v in vals)
    if not ok:
        raise ValueError(f"{name} must be [width, height] with two positive numbers, got {size!r}")
    return (size[0], size[1])  # type: ignore[index]


@dataclass(frozen=True)
class ParseContext:
    """What a parser needs besides the text.

    ``image_size``: original image (W, H); boxes come back in these pixels.
    ``input_size``: the resized model-input (W, H) (``qwen25_vl_json`` coordinates are in it);
    None means the same as ``image_size``.
    ``coords``: coordinate system of ``plain_xyxy``, a key of ``COORDS`` (None = ``pixel``).
    ``default_label``: label for boxes whose output names none (the prompt's phrase).
    ``truncated``: whether generation stopped at ``max_new_tokens`` (True: the text was cut;
    False: it is complete, so an unclosed structure is ``malformed``; None: unknown, the
    parser judges from the text alone).
    """

    image_size: tuple[float, float]
    input_size: tuple[float, float] | None = None
    coords: str | None = None
    default_label: str = ""
    truncated: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _check_size("image_size", self.image_size))
        if self.input_size is not None:
            object.__setattr__(self, "input_size", _check_size("input_size", self.input_size))
        if self.coords is not None and (
            not isinstance(self.coords, str) or self.coords not in COORDS
        ):
            raise ValueError(f"unknown coords {self.coords!r}; allowed: {', '.join(COORDS)}")
        if not isinstance(self.default_label, str):
            object.__setattr__(self, "default_label", str(self.default_label))
        if self.truncated is not None:
            object.__setattr__(self, "truncated", bool(self.truncated))


def coords_scale(coords: str | None, ctx: ParseContext) -> tuple[float, float]:
    """(sx, sy) that turn numbers in ``coords`` units into original-image pixels."""
    w, h = ctx.image_size
    if coords == "input_pixel":
        iw, ih = ctx.input_size or ctx.image_size
        return w / iw, h / ih
    div = COORDS[coords or "pixel"]
    return (1.0, 1.0) if div is None else (w / div, h / div)


class Collector:
    """Accumulates one output's boxes and the problems seen while parsing it.

    ``flags`` may hold ``truncated``, ``malformed``, ``out_of_range`` and ``empty`` (the output
    was an explicitly empty structure such as ``[]``); ``result`` turns them into one status.
    """

    def __init__(self, ctx: ParseContext, where: Sequence[int] | None = None) -> None:
        self.ctx = ctx
        self.boxes: list[Box] = []
        self.flags: set[str] = set()
        self.where = where  # raw index of each character of the text the parser reads
        self._w, self._h = float(ctx.image_size[0]), float(ctx.image_size[1])
        self._tol = 1e-6 * max(self._w, self._h)  # float noise of bin arithmetic is in range

    def add(
        self,
        xyxy: list[float | None] | tuple,
        label: object = None,
        span: tuple[int, int] | None = None,
        raw: tuple[float, float, float, float] | None = None,
    ) -> None:
        """Add a box given in original-image pixels; order corners, clamp, note problems.

        ``span``: where the box stood in the text being read (mapped to the raw text through
        ``where``); it becomes ``Box.span``."""
        if len(xyxy) != 4:
            self.flags.add("malformed")
            return
        a, b, c, d = xyxy
        # v != v: NaN has no place in the image, so the box is dropped (as a missing number is)
        if a is None or b is None or c is None or d is None or a != a or b != b or c != c or d != d:
            self.flags.add("malformed")
            return
        w, h, tol = self._w, self._h, self._tol
        # corners ordered (what sorted() does, written out: this runs once per box)
        x1, x2 = (c, a) if c < a else (a, c)
        y1, y2 = (d, b) if d < b else (b, d)
        if x1 < -tol or y1 < -tol or x2 > w + tol or y2 > h + tol:
            self.flags.add("out_of_range")
        # clamped into the image: min(max(v, 0.0), w), written out for the same reason
        x1 = 0.0 if x1 < 0.0 else w if x1 > w else x1
        x2 = 0.0 if x2 < 0.0 else w if x2 > w else x2
        y1 = 0.0 if y1 < 0.0 else h if y1 > h else y1
        y2 = 0.0 if y2 < 0.0 else h if y2 > h else y2
        text = label.strip() if isinstance(label, str) else ("" if label is None else str(label))
        if span is not None and self.where is not None:
            span = raw_span(self.where, *span)
        box = Box(x1, y1, x2, y2, label=text or self.ctx.default_label, span=span, raw=raw)
        self.boxes.append(box)

    def add_scaled(
        self,
        raw: list[float | None] | tuple,
        sx: float,
        sy: float,
        label: object = None,
        span: tuple[int, int] | None = None,
    ) -> None:
        """Add a box written as free-text numbers ``raw`` (x1, y1, x2, y2 in the format's
        units), scaled by ``(sx, sy)`` into pixels; the numbers are kept in ``Box.raw``."""
        if len(raw) != 4:
            self.add(raw, label, span)
            return
        a, b, c, d = raw
        if None in (a, b, c, d):
            self.add([a, b, c, d], label, span)  # a missing number: add() drops it as malformed
            return
        finite = math.isfinite(a) and math.isfinite(b) and math.isfinite(c) and math.isfinite(d)
        self.add([a * sx, b * sy, c * sx, d * sy], label, span, (a, b, c, d) if finite else None)

    def result(self, text: str) -> ParseResult:
        """Status precedence: truncated > malformed > empty > out_of_range > ok.

        With ``ctx.truncated`` known, ``truncated`` means the generation was cut at
        ``max_new_tokens`` (whatever the text looks like) and a structure left open in a
        complete output is ``malformed``; unknown (None), an open structure at the end of the
        text is taken as a cut."""
        f = self.flags
        cut = self.ctx.truncated
        if cut is False and "truncated" in f:
            f = (f - {"truncated"}) | {"malformed"}
        if cut is True or (cut is None and "truncated" in f):
            status = "truncated"
        elif "malformed" in f:
            status = "malformed"
        elif not self.boxes:
            status = "empty" if ("empty" in f or not text.strip()) else "malformed"
        elif "out_of_range" in f:
            status = "out_of_range"
        else:
            status = "ok"
        return ParseResult(status=status, boxes=self.boxes)


def floats(text: str) -> list[float | None]:
    """Every number in ``text``, in order."""
    return [to_float(m.group(0)) for m in NUM_RE.finditer(text)]
