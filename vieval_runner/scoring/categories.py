"""Failure categories per specimen and the suggested action for each (docs/metrics.md)."""

from __future__ import annotations

import math
import re
from collections import Counter

from vieval_runner.scoring.text import normalize_squad, normalize_vqa

GROUNDING_CATEGORIES: tuple[str, ...] = (
    "good",
    "loose",
    "missed",
    "false_positive",
    "inconsistent",
    "unparseable",
)
VQA_CATEGORIES: tuple[str, ...] = (
    "good",
    "incomplete",
    "hallucination",
    "format_mismatch",
    "wrong",
)

FAILURE_ACTIONS: dict[str, str] = {
    "good": "Nothing to fix: the prediction matches the reference.",
    "loose": (
        "Boxes land on the right object but are imprecise: check the coordinate "
        "convention/resize mapping, train longer, or weight the box loss."
    ),
    "missed": (
        "The model omits objects it should box: check that every instance is in the training "
        "targets, raise max_new_tokens if the output is cut, or train longer."
    ),
    "false_positive": (
        "The model boxes things that are not the phrase: add negative examples, check label "
        "noise, or lower the learning rate if it appeared late in training."
    ),
    "inconsistent": (
        "Boxes are both missing and extra, so the model is confused about where the object is: "
        "look at these images first, check the coordinate convention, or train longer."
    ),
    "unparseable": (
        "The output does not follow the box format: check the output_format setting and "
        "chat template, raise max_new_tokens if truncated, or train longer."
    ),
    "incomplete": (
        "The answer is right but partial: raise max_new_tokens if outputs are cut, or train "
        "on complete reference answers."
    ),
    "hallucination": (
        "The answer asserts content that is neither in the reference nor the question: check "
        "image-text alignment in the data, lower the learning rate, or stop at an earlier step."
    ),
    "format_mismatch": (
        "The answer has the wrong shape or length: align the prompt and chat template with the "
        "training data and train on answers in the expected format."
    ),
    "wrong": (
        "The answer has the right shape but the wrong content: more or cleaner training data "
        "for this question type, or train longer."
    ),
}

# Statuses that mean the parser could not read the output as intended. "empty" is not one:
# saying "no object" is a valid (scored) prediction.
PARSE_FAILURE_STATUSES: frozenset[str] = frozenset({"malformed", "truncated", "out_of_range"})


def grounding_category(
    parse_status: str, n_pred: int, tp: int, fp: int, fn: int, min_match_iou: float | None,
    tight_iou: float,
) -> str:  # fmt: skip
    """Category of one grounding specimen from its counts (see docs/metrics.md)."""
    if parse_status in PARSE_FAILURE_STATUSES and n_pred == 0:
        return "unparseable"
    if fp and fn:
        return "inconsistent"
    if fn:
        return "missed"
    if fp:
        return "false_positive"
    if min_match_iou is not None and min_match_iou < tight_iou:
        return "loose"
    return "good"


# Function words that carry no claim about the image: ignored when looking for hallucinated
# content. "yes", "no" and numbers are deliberately not here: they are answers.
_STOPWORDS = frozenset(
    str.split(
        "a an the is are was were be been being am of in on at to for with by from and or but "
        "it its this that these those there here he she they them his her their i you we my your "
        "our me us as so than then very can could would should will do does did has have had "
        "what which who whom whose where when why how into onto over under up down out off"
    )
)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def _shape(normalized: str) -> str:
    if normalized in ("yes", "no"):
        return "yes_no"
    if _NUMBER.fullmatch(normalized):
        return "number"
    return "text"


def vqa_category(
    pred: str | None,
    refs: list[str],
    prompt: str | None,
    token_f1: float,
    exact_match: float,
    *,
    good_f1: float = 0.8,
    format_ratio: float = 3.0,
    incomplete_precision: float = 0.75,
    hallucination_min_tokens: int = 2,
    hallucination_share: float = 0.5,
) -> str:
    """Category of one VQA specimen; rules are checked in the order of docs/metrics.md."""
    pred_norm = normalize_vqa(pred)
    if not pred_norm and any(normalize_vqa(r) for r in refs):
        # nothing answered where a reference says something: checked before "good", since an
        # empty answer equals a reference that normalises to "" (an article, punctuation)
        return "format_mismatch"
    if exact_match >= 1.0 or token_f1 >= good_f1:
        return "good"
    if not pred_norm:
        return "format_mismatch"  # nothing answered at all
    ref_shapes = {_shape(normalize_vqa(r)) for r in refs}
    # Shape: a sentence (or anything else) where every reference is a number or yes/no.
    expected = ref_shapes.pop() if len(ref_shapes) == 1 else "text"
    if expected != "text" and _shape(pred_norm) != expected:
        return "format_mismatch"
    pred_toks = normalize_squad(pred).split()
    ref_toks = [normalize_squad(r).split() for r in refs]
    # Incomplete: nearly everything said is in some reference, but that reference says more.
    for toks in ref_toks:
        common = sum((Counter(pred_toks) & Counter(toks)).values())
        if pred_toks and toks and common:
            precision, recall = common / len(pred_toks), common / len(toks)
            if precision >= incomplete_precision and recall < precision:
                return "incomplete"
    n_pred = max(len(pred_norm.split()), 1)
    ratios = [n_pred / max(len(normalize_vqa(r).split()), 1) for r in refs]
    closest = min(ratios, key=lambda r: abs(math.log(r)))
    if closest >= format_ratio or closest <= 1 / format_ratio:
        return "format_mismatch"
    known = set().union(*ref_toks, normalize_squad(prompt).split())
    content = [t for t in pred_toks if t not in _STOPWORDS]
    novel = [t for t in content if t not in known]
    if len(novel) >= hallucination_min_tokens and len(novel) >= hallucination_share * len(content):
        return "hallucination"
    return "wrong"
