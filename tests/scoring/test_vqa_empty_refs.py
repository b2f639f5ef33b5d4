"""Token F1 with references that normalise to "": the official SQuAD 2.0 rule, and the VQA
category of an empty answer."""

from __future__ import annotations

import pytest

from vieval_runner.scoring import score_vqa
from vieval_runner.scoring.vqa import answerable_refs


# Expected values: SQuAD 2.0 official script ``evaluate-v2.0.py``, ``get_raw_scores``:
#   gold_answers = [a['text'] for a in qa['answers'] if normalize_answer(a['text'])]
#   if not gold_answers: gold_answers = ['']
#   f1 = max(compute_f1(a, a_pred) for a in gold_answers)
# and ``compute_f1``: if either side has no tokens, ``int(gold_toks == pred_toks)``.
@pytest.mark.parametrize(
    ("pred", "refs", "f1"),
    [
        ("", ["a", "dog"], 0.0),  # "a" normalises to "": dropped; "" vs "dog" -> 0
        ("", ["the", "."], 1.0),  # every reference empty: gold is [""], "" vs "" -> 1
        ("dog", ["the", "."], 0.0),  # gold [""]; "dog" vs "" -> 0
        ("dog", ["an", "dog"], 1.0),
        ("a", ["a", "dog"], 0.0),  # the prediction normalises to "" too
        ("big dog", ["", "the dog"], 2 * 0.5 * 1.0 / 1.5),  # P 1/2, R 1/1
    ],
)
def test_token_f1_drops_references_that_normalise_to_empty(pred, refs, f1):
    (row,) = score_vqa([pred], [refs])
    assert row["token_f1"] == pytest.approx(f1)


def test_answerable_refs_keeps_the_official_fallback():
    assert answerable_refs(["a", "dog", "!"]) == ["dog"]
    assert answerable_refs(["a", "the"]) == [""]


def test_empty_answer_is_not_good_against_a_reference_that_normalises_to_empty():
    # Before the fix: F1 1.0 and exact match 1.0 through the reference "a", category "good".
    (row,) = score_vqa([""], [["a", "dog"]])
    assert row["exact_match"] == 0.0 and row["token_f1"] == 0.0
    assert row["failure_category"] == "format_mismatch"
    (row,) = score_vqa(["the"], [["a", "dog"]])  # an article alone is no answer either
    assert row["failure_category"] == "format_mismatch"
    # every reference empty: the empty answer is right (SQuAD 2.0's unanswerable case)
    (row,) = score_vqa([""], [["a", "."]])
    assert row["token_f1"] == 1.0 and row["failure_category"] == "good"
