"""Raw model text -> boxes in original-image pixels (grounding) or an answer (VQA).

Formats (``FORMATS``; DESIGN.md section 5):

- ``qwen2_vl``: ``<|object_ref_start|>p<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``,
  0-1000 relative. A box without its own phrase takes the previous phrase (or the default).
- ``qwen25_vl_json``: JSON ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`` in absolute pixels
  of the *resized* model input, scaled by ``image_size / input_size``.
- ``qwen3_vl_json``: the same JSON, 0-1000 relative.
- ``gemini_json``: ``[{"box_2d": [ymin, xmin, ymax, xmax], "label": ...}]``, y first, 0-1000.
- ``moondream``: ``{"objects": [{"x_min", "y_min", "x_max", "y_max"}]}``, 0-1.
  JSON formats read only their own box keys; a box under another convention's key is not
  read and makes the output ``malformed`` (never guess an axis order from a key name).
- ``paligemma_loc``: ``<locY1><locX1><locY2><locX2> label ; ...``, each ``bin / 1024 * size``
  (big_vision convention).
- ``florence2_loc``: ``label<loc_x1><loc_y1><loc_x2><loc_y2>...``, ``(bin + 0.5) / 1000 * size``
  (transformers ``Florence2PostProcessor.dequantize``, which then truncates to int; we keep the
  float bin centre). Unlike transformers, non-ASCII labels are kept.
- ``florence2_ocr``: ``text`` + 8 location tokens per quadrilateral, read as its bounding box.
- ``internvl``: ``<ref>p</ref><box>[[x1, y1, x2, y2], ...]</box>``, 0-1000 relative; also the
  tagless ``p[[x1, y1, x2, y2]]`` that ``skip_special_tokens=True`` leaves.
- ``deepseek_vl2``: ``<|ref|>p<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>``, 0-999.
- ``kosmos2``: ``<phrase>p</phrase><object><patch_index_UL><patch_index_LR></object>``, 32x32 grid
  (transformers ``patch_index_to_coordinate``).
- ``plain_xyxy``: every ``[x1, y1, x2, y2]`` or ``(x1, y1, x2, y2)`` (with none, bare
  ``x1,y1,x2,y2``), in ``coords`` units (``COORDS``: ``pixel`` (default), ``input_pixel``,
  ``relative_1000``, ``relative_1024``, ``normalized_1``, ``percent``); labels are always the
  default label.

Decisions:

- Every box is in original-image pixels, ``x1 <= x2``, ``y1 <= y2`` (swapped corners are
  ordered, silently), clamped to ``[0, W] x [0, H]``, ``score`` None, label from the output or
  ``default_label``, and ``span``: where it stood in the exact text given (residue, fences
  and prose included), so ``results`` can score it by the tokens that wrote it. Zero-area boxes (also those clamped flat onto an edge) are kept: they are
  the model's prediction and score as a miss.
- Exact duplicates are kept: a repetition loop is a real failure the scorer should count as
  false positives, not something the parser hides.
- Before parsing, chat/EOS residue is removed: leading BOS/role headers/padding, and everything
  from the first end-of-turn token (``<|im_end|>``, ``<end_of_turn>``, ``</s>``, ``<eos>``,
  ``<|endoftext|>`` ...) on.
- Status precedence: ``truncated`` (generation hit ``max_new_tokens``, when that is known; else
  the text stops inside a structure; the entries that closed before the cut are kept) >
  ``malformed`` (with the verdict known, a structure left open in a complete output is this) (a structure that cannot be read, e.g. a box with 3
  numbers or NaN, or non-empty text with no box at all) > ``empty`` (blank output, or an
  explicitly empty list ``[]``) > ``out_of_range`` (a coordinate outside the format's range /
  the image, including +-inf: clamped) > ``ok``. The boxes are always every box that could be
  read, whatever the status.
- Junk is data: parsers never raise. ``parse_grounding`` raises ``ValueError`` only for caller
  errors (unknown format, bad ``image_size``/``input_size``, unknown ``coords``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from vieval_runner.parsing.common import COORDS, ParseContext, clean_text
from vieval_runner.parsing.json_formats import (
    parse_gemini_json,
    parse_moondream,
    parse_plain_xyxy,
    parse_qwen3_vl_json,
    parse_qwen25_vl_json,
)
from vieval_runner.parsing.locations import (
    FLORENCE2_BANNED_GROUNDING_TOKENS,
    parse_florence2_loc,
    parse_florence2_ocr,
    parse_paligemma_loc,
)
from vieval_runner.parsing.tagged import (
    parse_deepseek_vl2,
    parse_internvl,
    parse_kosmos2,
    parse_qwen2_vl,
)
from vieval_runner.records import ParseResult

__all__ = [
    "COORDS",
    "FLORENCE2_BANNED_GROUNDING_TOKENS",
    "FORMATS",
    "FORMAT_FRAMES",
    "PARSER_VERSION",
    "ParseContext",
    "clean_text",
    "frame_setting",
    "native_frame",
    "parse_answer",
    "parse_grounding",
    "parse_record",
    "result_to_json",
]

#: Bump on any change of parsing behaviour: stored with each evaluation for ``vieval rescore``.
PARSER_VERSION = "1.2.0"  # 1.1: boxes carry their text span (per-box scores); 1.2: see below
# 1.2: the generation's max_new_tokens verdict decides truncated vs malformed; lists broken by a
# stray brace recover every whole object; formats refuse box keys of another convention
# (box_2d is y first); InternVL/DeepSeek-VL2 tagless output, InternVL scene-graph relations,
# Florence-2 banned phrases; gemini_json, deepseek_vl2, moondream, florence2_ocr; bare
# "x1,y1,x2,y2" numbers and coords=input_pixel in plain_xyxy.

FORMATS: dict[str, Callable[[str, ParseContext], ParseResult]] = {
    "qwen2_vl": parse_qwen2_vl,
    "qwen25_vl_json": parse_qwen25_vl_json,
    "qwen3_vl_json": parse_qwen3_vl_json,
    "paligemma_loc": parse_paligemma_loc,
    "florence2_loc": parse_florence2_loc,
    "florence2_ocr": parse_florence2_ocr,
    "internvl": parse_internvl,
    "kosmos2": parse_kosmos2,
    "plain_xyxy": parse_plain_xyxy,
    "gemini_json": parse_gemini_json,
    "deepseek_vl2": parse_deepseek_vl2,
    "moondream": parse_moondream,
}

#: The frame each format's free-text numbers are in (a key of ``COORDS``, or
#: ``relative_999``), for the coordinate-frame check; None: the numbers are vocabulary tokens
#: (location bins, patch indices), whose frame cannot be mistaken. ``plain_xyxy``: ``coords``.
FORMAT_FRAMES: dict[str, str | None] = {
    "qwen2_vl": "relative_1000",
    "qwen25_vl_json": "input_pixel",
    "qwen3_vl_json": "relative_1000",
    "paligemma_loc": None,
    "florence2_loc": None,
    "florence2_ocr": None,
    "internvl": "relative_1000",
    "kosmos2": None,
    "plain_xyxy": "pixel",
    "gemini_json": "relative_1000",
    "deepseek_vl2": "relative_999",
    "moondream": "normalized_1",
}
# A format that reads the same shape of output in another frame (the setting to suggest).
_SAME_SHAPE: dict[tuple[str, str], str] = {
    ("qwen25_vl_json", "relative_1000"): "qwen3_vl_json",
    ("qwen3_vl_json", "input_pixel"): "qwen25_vl_json",
}


def native_frame(fmt: str | None, coords: str | None = None) -> str | None:
    """The frame ``fmt``'s numbers are read in (``coords`` for ``plain_xyxy``)."""
    if fmt == "plain_xyxy":
        return coords or "pixel"
    return FORMAT_FRAMES.get(fmt or "")


def frame_setting(fmt: str | None, frame: str) -> str:
    """The setting that reads ``fmt``-shaped output in ``frame`` (what to tell the user)."""
    if fmt == "plain_xyxy":
        return f"coords={frame}"
    other = _SAME_SHAPE.get((fmt or "", frame))
    if other:
        return f"output_format={other}"
    return f"output_format=plain_xyxy with coords={frame}"


_log = logging.getLogger(__name__)
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}


def parse_grounding(
    text: str,
    fmt: str,
    image_size: tuple[float, float],
    input_size: tuple[float, float] | None = None,
    coords: str | None = None,
    default_label: str = "",
    truncated: bool | None = None,
) -> ParseResult:
    """Parse one grounding output in format ``fmt``; boxes come back in original-image pixels.

    ``truncated``: whether generation hit ``max_new_tokens`` (None: unknown, judged from the
    text). Never raises on model output; raises ``ValueError`` for an unknown
    ``fmt``/``coords`` or an invalid size (configuration errors).
    """
    parser = FORMATS.get(fmt)
    if parser is None:
        raise ValueError(f"unknown output format {fmt!r}; allowed: {', '.join(FORMATS)}")
    ctx = ParseContext(image_size, input_size, coords, default_label, truncated)
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    try:
        return parser(text, ctx)
    except Exception:  # a parser bug must not stop an evaluation run: count it as unreadable
        _log.exception("parser %s failed on %r", fmt, text[:200])
        return ParseResult(status="malformed")


def parse_answer(text: str) -> ParseResult:
    """A VQA answer: chat/EOS residue, surrounding whitespace and one pair of quotes removed."""
    answer = clean_text(text if isinstance(text, str) else "")
    if len(answer) >= 2 and _QUOTES.get(answer[0]) == answer[-1]:
        answer = answer[1:-1].strip()
    return ParseResult(status="ok" if answer else "empty", answer=answer)


def result_to_json(result: ParseResult) -> dict:
    """``{"status", "boxes": [{"label", "box": [x1, y1, x2, y2]}]}`` (+ ``answer`` if any)."""
    out: dict = {
        "status": result.status,
        "boxes": [
            {"label": b.label, "box": [round(v, 2) for v in b.as_list()]} for b in result.boxes
        ],
    }
    if result.answer is not None:
        out["answer"] = result.answer
    return out


def _size_field(obj: dict, key: str, required: bool) -> tuple[float, float] | None:
    v = obj.get(key)
    if v is None and not required:
        return None
    ok = isinstance(v, list) and len(v) == 2
    ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    if not ok or not all(math.isfinite(x) and x > 0 for x in v):
        raise ValueError(f"{key} must be [width, height] with two positive numbers, got {v!r}")
    return (v[0], v[1])


def parse_record(obj: object) -> dict:
    """One ``vieval parse --jsonl`` line -> ``result_to_json`` shape; bad records -> error dict.

    Input: ``{"text", "format", "image_size": [W, H], "input_size": [W, H] | null}`` and
    optionally ``coords``, ``default_label`` and ``truncated`` (the text was cut at
    ``max_new_tokens``; default false: the text is complete). Never raises.
    """
    if not isinstance(obj, dict):
        return {
            "status": "error",
            "error": f"record must be a JSON object, got {type(obj).__name__}",
        }
    missing = [k for k in ("text", "format", "image_size") if k not in obj]
    if missing:
        return {"status": "error", "error": f"record is missing field(s): {', '.join(missing)}"}
    if not isinstance(obj["text"], str):
        return {
            "status": "error",
            "error": f"text must be a string, got {type(obj['text']).__name__}",
        }
    try:
        image_size = _size_field(obj, "image_size", True)
        input_size = _size_field(obj, "input_size", False)
        label = obj.get("default_label") or ""
        cut = obj.get("truncated", False)
        if not isinstance(cut, bool):
            raise ValueError(f"truncated must be true or false, got {cut!r}")
        result = parse_grounding(
            obj["text"],
            str(obj["format"]),
            image_size,
            input_size,
            obj.get("coords"),
            str(label),
            truncated=cut,
        )
    except (ValueError, TypeError) as e:
        return {"status": "error", "error": str(e)}
    return result_to_json(result)
