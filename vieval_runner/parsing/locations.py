"""Parsers for runs of location tokens: PaliGemma (``<locNNNN>``, label after the run) and
Florence-2 (``<loc_NNN>``, label before the run; phrase grounding and OCR with regions).

Box spans (``Box.span``, raw-text positions): a run's boxes take their own location tokens
plus the label (PaliGemma: up to the ``;``; Florence-2: the text before).
"""

from __future__ import annotations

import re

from vieval_runner.parsing.common import Collector, ParseContext, clean_text_map, remove_map
from vieval_runner.records import ParseResult

#: Florence-2's ``phrase_grounding.banned_grounding_tokens`` (the post-processor config of the
#: released checkpoints, as transformers'
#: ``models/florence2/convert_florence2_original_pytorch_to_hf.py`` writes it into
#: ``processor_config.json``): ``Florence2PostProcessor.parse_phrase_grounding_from_text_and_spans``
#: drops a phrase whose stripped text is one of these (exact, case-sensitive match).
FLORENCE2_BANNED_GROUNDING_TOKENS: frozenset[str] = frozenset(
    str.split(
        "it I me mine you your yours he him his she her hers they them their theirs one oneself "
        "we us our ours its myself yourself himself herself itself ourselves yourselves "
        "themselves this that these those who whom whose which what all another any anybody "
        "anyone anything each everybody everyone everything few many nobody none several some "
        "somebody someone something image images the a an lots"
    )
) | frozenset({"each other", "one another", "the image", "a group", "other objects", "a set"})
_SEG = re.compile(r"<seg\d+>")
_PALI_RUN = re.compile(r"(?:<loc(\d{1,6})>)+")
_FLOR_RUN = re.compile(r"(?:<loc_(\d{1,6})>)+")
_ANY_TAG = re.compile(r"<[^<>]*>")


def _loc_runs(text: str, run_re: re.Pattern, prefix: str, col: Collector, per: int = 4):
    """Yield (run index, complete groups of ``per`` bins, their spans, runs) per location run;
    flag broken runs. A group's span covers its location tokens."""
    token = re.compile(re.escape(prefix) + r"(\d{1,6})>")
    runs = list(run_re.finditer(text))
    for i, run in enumerate(runs):
        locs = list(token.finditer(text, run.start(), run.end()))
        if len(locs) % per:
            at_end = i == len(runs) - 1 and not text[run.end() :].strip()
            col.flags.add("truncated" if at_end else "malformed")
        whole = range(0, len(locs) - len(locs) % per, per)
        quads = [[int(m.group(1)) for m in locs[k : k + per]] for k in whole]
        spans = [(locs[k].start(), locs[k + per - 1].end()) for k in whole]
        yield i, quads, spans, runs


def parse_paligemma_loc(text: str, ctx: ParseContext) -> ParseResult:
    """``<locY1><locX1><locY2><locX2> label ; ...``: y first, each ``bin / 1024 * size``."""
    text, where = remove_map(text, list(range(len(text))), _SEG)
    text, where = clean_text_map(text, where)
    col = Collector(ctx, where)
    w, h = ctx.image_size
    for i, quads, spans, runs in _loc_runs(text, _PALI_RUN, "<loc", col):
        tail_end = runs[i + 1].start() if i + 1 < len(runs) else len(text)
        label = text[runs[i].end() : tail_end].split(";")[0]
        label_end = runs[i].end() + len(label.rstrip())  # the run's last box owns its label
        for k, ((y1, x1, y2, x2), span) in enumerate(zip(quads, spans, strict=True)):
            if k == len(quads) - 1:
                span = (span[0], label_end)
            col.add([x1 / 1024 * w, y1 / 1024 * h, x2 / 1024 * w, y2 / 1024 * h], label, span)
    return col.result(text)


def parse_florence2_loc(text: str, ctx: ParseContext) -> ParseResult:
    """``label<loc_x1><loc_y1><loc_x2><loc_y2>...``: 1000 bins, dequantized at bin + 0.5.

    A phrase in ``FLORENCE2_BANNED_GROUNDING_TOKENS`` ("the image", "it", ...) is dropped with
    its boxes, as Florence-2's own phrase-grounding post-processor does."""
    text, where = clean_text_map(text)
    col = Collector(ctx, where)
    w, h = ctx.image_size
    for i, quads, spans, runs in _loc_runs(text, _FLOR_RUN, "<loc_", col):
        head_start = runs[i - 1].end() if i else 0
        head = text[head_start : runs[i].start()]
        label = _ANY_TAG.sub("", head)
        if label.strip() in FLORENCE2_BANNED_GROUNDING_TOKENS:
            col.flags.add("empty")  # not a prediction: "nothing to box" if nothing else is
            continue
        head_start += len(head) - len(head.lstrip())
        for k, ((x1, y1, x2, y2), span) in enumerate(zip(quads, spans, strict=True)):
            if k == 0:
                span = (head_start, span[1])  # the run's first box owns the label before it
            col.add(
                [
                    (x1 + 0.5) * w / 1000,
                    (y1 + 0.5) * h / 1000,
                    (x2 + 0.5) * w / 1000,
                    (y2 + 0.5) * h / 1000,
                ],
                label,
                span,
            )
    return col.result(text)


def parse_florence2_ocr(text: str, ctx: ParseContext) -> ParseResult:
    """Florence-2 ``<OCR_WITH_REGION>``: ``text<loc_x1><loc_y1>...<loc_x4><loc_y4>``, eight
    location tokens per quadrilateral (transformers ``parse_ocr_from_text_and_spans``), each
    point at its bin centre; a quad becomes its bounding box, labelled with its text."""
    text, where = clean_text_map(text)
    col = Collector(ctx, where)
    w, h = ctx.image_size
    for i, quads, spans, runs in _loc_runs(text, _FLOR_RUN, "<loc_", col, per=8):
        head_start = runs[i - 1].end() if i else 0
        head = text[head_start : runs[i].start()]
        label = _ANY_TAG.sub("", head)
        head_start += len(head) - len(head.lstrip())
        for k, (quad, span) in enumerate(zip(quads, spans, strict=True)):
            if k == 0:
                span = (head_start, span[1])
            xs = [(v + 0.5) * w / 1000 for v in quad[0::2]]
            ys = [(v + 0.5) * h / 1000 for v in quad[1::2]]
            col.add([min(xs), min(ys), max(xs), max(ys)], label, span)
    return col.result(text)
