"""VQA scoring: official normalization, VQA accuracy, SQuAD F1, BLEU, ROUGE-L, ANLS,
failure categories and the per-step aggregate."""

from __future__ import annotations

import random
import re

import pytest
import sacrebleu

from vieval_runner.scoring import (
    BERTSCORE_NOTE,
    FAILURE_ACTIONS,
    VQA_CATEGORIES,
    aggregate_vqa,
    anls_single,
    normalize_squad,
    normalize_vqa,
    rouge_l,
    score_vqa,
    squad_f1,
    vqa_accuracy,
)
from vieval_runner.scoring.text import _PERIOD_STRIP


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("two", "2"),
        ("Two.", "2"),
        ("none", "0"),
        ("the dog", "dog"),
        ("A Dog", "dog"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Yes!", "yes"),
        ("black/white", "black white"),  # a mark inside a word becomes a space
        ("black / white", "black white"),  # a mark next to a space is deleted
        ("Hello, world", "hello world"),
        ("1,000", "1000"),  # digit,digit anywhere: every mark is deleted, not spaced
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("in the\tbox.\n", "in box"),
        ("man's hat", "man's hat"),  # apostrophes are not punctuation in VQA
    ],
)
def test_normalize_vqa_official_examples(text, expected):
    assert normalize_vqa(text) == expected


def test_period_rule_equals_official_regex():
    # The official script uses the (odd) pattern below; ours is the simpler equivalent.
    official = re.compile(r"(?!<=\d)(\.)(?!\d)")
    rng = random.Random(0)
    for _ in range(2000):
        s = "".join(rng.choice("a1. <=9x") for _ in range(rng.randint(0, 12)))
        assert _PERIOD_STRIP.sub("", s) == official.sub("", s), s


def official_vqa_accuracy(pred: str, refs: list[str]) -> float:
    """The official loop: leave each reference datum out in turn, count the others equal
    to the prediction, min(1, count / 3), average."""
    data = [{"answer": normalize_vqa(r), "answer_id": i} for i, r in enumerate(refs)]
    res = normalize_vqa(pred)
    accs = []
    for datum in data:
        others = [d for d in data if d != datum]
        accs.append(min(1.0, len([d for d in others if d["answer"] == res]) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    ("n_match", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)]
)
def test_vqa_accuracy_ten_references(n_match, expected):
    refs = ["2"] * n_match + ["3", "three dogs", "4", "many", "5", "6", "7", "8", "9", "10"]
    refs = refs[:10]
    assert vqa_accuracy("two", refs) == pytest.approx(expected)
    assert vqa_accuracy("two", refs) == pytest.approx(official_vqa_accuracy("two", refs))


def test_vqa_accuracy_matches_official_loop_on_random_answers():
    rng = random.Random(1)
    vocab = ["yes", "no", "2", "two", "the dog", "dog", "Dog.", "cat"]
    for _ in range(300):
        refs = [rng.choice(vocab) for _ in range(rng.randint(3, 10))]
        pred = rng.choice(vocab)
        assert vqa_accuracy(pred, refs) == pytest.approx(official_vqa_accuracy(pred, refs))
    assert vqa_accuracy("dog", ["dog", "dog"]) is None  # fewer than 3 references


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("Denver Broncos", "The Denver Broncos", 1.0),
        ("the cat sat on the mat", "cat on mat", 2 * 0.75 * 1.0 / 1.75),
        # 2 common tokens; P = 2/3, R = 2/5 ("levis stadium in santa clara")
        ("Santa Clara, California", "Levi's Stadium in Santa Clara", 0.5),
        ("red", "blue", 0.0),
        ("", "blue", 0.0),
        ("the", "a", 1.0),  # both normalize to nothing: equal
    ],
)  # fmt: skip
def test_squad_f1_worked_examples(pred, ref, expected):
    assert squad_f1(pred, ref) == pytest.approx(expected)


def test_normalize_squad():
    assert normalize_squad("The  Cat's hat!") == "cats hat"


def test_token_f1_is_max_over_references():
    got = score_vqa(["red car"], [["blue car", "red car", "car"]])[0]
    assert got["token_f1"] == 1.0


def test_bleu_equals_sacrebleu_directly():
    preds = ["a red car parked on the street", "two dogs", None, "it is sunny today"]
    refs = [["a red car is parked on the street", "red car on a street"], ["2 dogs"], ["cat"],
            ["sunny", "it is sunny", "the weather is sunny today"]]  # fmt: skip
    per = score_vqa(preds, refs)
    for p, r, d in zip(preds, refs, per, strict=True):
        assert d["bleu"] == pytest.approx(sacrebleu.sentence_bleu(p or "", r).score)
    assert per[0]["bleu"] > 10
    agg = aggregate_vqa(per, preds, refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(3)]
    expect = sacrebleu.corpus_bleu([p or "" for p in preds], streams).score
    assert agg["bleu"] == pytest.approx(expect, abs=1e-12)  # from the summed bleu_stats
    stripped = [{k: v for k, v in d.items() if k != "bleu_stats"} for d in per]
    assert aggregate_vqa(stripped, preds, refs)["bleu"] == pytest.approx(expect, abs=1e-12)
    same = aggregate_vqa(score_vqa([r[0] for r in refs], refs), [r[0] for r in refs], refs)
    assert same["bleu"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("the cat sat on the mat", "the cat on the mat", 10 / 11),  # LCS 5; P 5/6, R 1
        ("police killed the gunman", "the gunman killed police", 0.5),  # LCS 2 of 4
        ("A B C", "a b c", 1.0),
        ("", "anything", 0.0),
        ("x y", "z", 0.0),
    ],
)
def test_rouge_l_hand_examples(pred, ref, expected):
    assert rouge_l(pred, ref) == pytest.approx(expected)


def test_rouge_l_equals_torchmetrics():
    from torchmetrics.functional.text.rouge import rouge_score

    pairs = [("The cat, sat on the mat!", "a cat sat on a mat"), ("red car", "the car is red"),
             ("one two three four", "four three two one")]  # fmt: skip
    for p, r in pairs:
        tm = float(rouge_score(p, r, rouge_keys="rougeL")["rougeL_fmeasure"])
        assert rouge_l(p, r) == pytest.approx(tm, abs=1e-6)


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("Hello", "hello", 1.0),  # case-insensitive
        ("  new   york ", "New York", 1.0),  # whitespace-normalized
        ("recieve", "receive", 1 - 2 / 7),  # two substitutions over 7 chars
        ("1995", "1996", 0.75),
        ("ab", "ac", 0.0),  # NL = 0.5 is not < 0.5
        ("abc", "xyz", 0.0),
        ("", "abc", 0.0),
    ],
)
def test_anls_worked_examples(pred, ref, expected):
    assert anls_single(pred, ref) == pytest.approx(expected)


def test_anls_is_max_over_references_and_threshold_is_a_parameter():
    got = score_vqa(["recieve"], [["xyz", "receive"]])[0]
    assert got["anls"] == pytest.approx(1 - 2 / 7)
    assert score_vqa(["ab"], [["ac"]], anls_threshold=0.6)[0]["anls"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("pred", "refs", "prompt", "category"),
    [
        ("Two", ["2"], "How many dogs?", "good"),
        ("a red car", ["red car"], "What is parked?", "good"),
        ("red", ["red and white"], "What colors is the shirt?", "incomplete"),
        ("red car", ["red car with a white roof"], "What is parked?", "incomplete"),
        ("there are three dogs in the picture", ["3"], "How many dogs?", "format_mismatch"),
        ("yes, there is a dog", ["yes", "yes"], "Is there a dog?", "format_mismatch"),
        ("the weather today looks sunny and quite warm outside", ["rainy"], "Weather?",
         "format_mismatch"),
        ("", ["red"], "What color?", "format_mismatch"),
        (None, ["red"], "What color?", "format_mismatch"),
        ("black cat sleeping on a sofa", ["brown dog on the beach"], "What is in the picture?",
         "hallucination"),
        ("blue", ["red"], "What color is the car?", "wrong"),
        ("yes", ["no"], "Is it raining?", "wrong"),
        ("3", ["2"], "How many?", "wrong"),
        # Content taken from the question is not invented: wrong, not hallucination ...
        ("red bus", ["blue car"], "What is next to the red bus?", "wrong"),
        # ... but the same answer with no question to draw on is.
        ("red bus", ["blue car"], None, "hallucination"),
    ],
)  # fmt: skip
def test_vqa_failure_categories(pred, refs, prompt, category):
    got = score_vqa([pred], [refs], None if prompt is None else [prompt])[0]
    assert got["failure_category"] == category
    assert got["failure_action"] == FAILURE_ACTIONS[category]


def test_vqa_category_thresholds_are_parameters():
    # token F1 0.5: "wrong"-side by default, "good" with a lenient threshold.
    assert score_vqa(["red"], [["red and white"]], good_f1=0.5)[0]["failure_category"] == "good"
    long = "the weather today looks sunny and quite warm outside"
    assert score_vqa([long], [["rainy"]], format_ratio=20)[0]["failure_category"] != (
        "format_mismatch"
    )


def test_vqa_exact_match_and_per_specimen_keys():
    got = score_vqa(["The dog.", "cat", None], [["dog"], ["dog", "a cat"], ["none"]])
    assert [d["exact_match"] for d in got] == [1.0, 1.0, 0.0]
    assert all(d["bertscore"] is None for d in got)
    assert set(got[0]) == {"exact_match", "vqa_accuracy", "token_f1", "bleu", "rouge_l", "anls",
                           "bertscore", "failure_category", "failure_action", "bleu_stats"}  # fmt: skip
    assert set(VQA_CATEGORIES) <= set(FAILURE_ACTIONS)


def test_aggregate_vqa_by_hand():
    preds = ["dog", "", "2", None]
    refs = [["dog"], ["cat"], ["two", "2", "2", "3"], ["red"]]
    per = score_vqa(preds, refs)
    agg = aggregate_vqa(per, preds, refs)
    assert agg["exact_match"] == pytest.approx(2 / 4)
    # Only specimen 3 has >= 3 references ("two" normalizes to "2"): leaving out a "2" leaves
    # two matches (2/3), leaving out "3" leaves three (1) -> (3 * 2/3 + 1) / 4.
    assert agg["vqa_accuracy"] == pytest.approx(0.75)
    assert agg["token_f1"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert agg["anls"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert agg["rouge_l"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert agg["parse_failure_rate"] == pytest.approx(2 / 4)
    assert agg["n_specimens"] == 4
    assert agg["bertscore"] is None and agg["bertscore_note"] == BERTSCORE_NOTE


def test_aggregate_vqa_of_nothing_and_bad_input():
    agg = aggregate_vqa([], [], [])
    assert agg["n_specimens"] == 0 and agg["exact_match"] is None and agg["bleu"] is None
    with pytest.raises(ValueError, match="specimen img7.jpg has no reference answers"):
        score_vqa(["x"], [[]], specimen_ids=["img7.jpg"])
    with pytest.raises(ValueError, match="2 predictions, 1 reference lists"):
        score_vqa(["x", "y"], [["x"]])
