"""BLEU's interval and paired comparison: corpus BLEU of summed per-answer statistics, against
sacrebleu's ``corpus_bleu`` on the same (resampled) corpora."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from vieval_runner.scoring import bleu, intervals
from vieval_runner.testing.vqa_stat_store import (
    corpus_bleu,
    sacrebleu_interval,
    sacrebleu_paired_interval,
    vqa_answers,
    vqa_specimens,
)

# 1-3 references, empty and None answers, an empty reference, answers without any n-gram
# match, answers shorter (brevity penalty) and longer than their references
CORPUS = [
    ("a red square", ["red", "a red square"]),
    ("", ["nothing here"]),
    (None, ["x"]),
    ("two", ["two", "2", "a pair"]),
    ("the cat sat on the mat", ["the cat sat on a mat", "a cat on the mat"]),
    ("zebra xylophone", ["red"]),
    ("stop here now please", ["stop here now"]),
    ("blue", [""]),
    ("It's 3 o'clock.", ["it is 3 o'clock", "three"]),
    ("a big red dog runs", ["a big dog runs"]),  # 3- and 4-grams, none matched: smoothed
]


SUBSETS = {
    "all": range(len(CORPUS)),
    "no-match": [5],
    "empty-and-no-match": [1, 2, 5],
    "no-4gram": [0, 3],
    "unigrams-only": [3, 7],
    "long": [4, 6, 8],
    "none": [2],
    "smoothed": [9],
    "smoothed-2": [0, 9],
}


@pytest.mark.parametrize("keep", SUBSETS.values(), ids=SUBSETS.keys())
def test_summed_sentence_statistics_give_corpus_bleu(keep):
    answers = [CORPUS[i][0] for i in keep]
    refs = [CORPUS[i][1] for i in keep]
    stats = bleu.sentence_statistics(answers, refs)
    assert stats.shape == (len(answers), bleu.N_STATS)
    got = bleu.corpus_scores(stats.sum(0)[None])
    # reference: sacrebleu on the whole corpus, streams padded with None (as aggregate_vqa)
    assert got.tolist() == [corpus_bleu([a or "" for a in answers], refs)]


def test_corpus_scores_score_each_row():
    stats = bleu.sentence_statistics(*zip(*CORPUS, strict=True))
    subsets = ([0, 4, 6], [5], range(len(CORPUS)))
    expected = [
        corpus_bleu([CORPUS[i][0] or "" for i in idx], [CORPUS[i][1] for i in idx])
        for idx in subsets
    ]
    sums = np.stack([stats[list(idx)].sum(0) for idx in subsets])
    assert bleu.corpus_scores(sums).tolist() == expected
    assert bleu.corpus_scores(np.zeros((0, bleu.N_STATS))).shape == (0,)


def _corpus(quality: float, seed: int, n: int = 60):
    specimens = vqa_specimens(n, seed)
    refs = [s.ref_answers for s in specimens]
    return vqa_answers(specimens, quality, seed + 1), refs


def _rows(answers, refs) -> dict:
    return {
        "exact_match": [float(a in r) for a, r in zip(answers, refs, strict=True)],
        "bleu": [sacrebleu.sentence_bleu(a, r).score for a, r in zip(answers, refs, strict=True)],
        "pred_answer": answers,
        "ref_answers": refs,
    }


def test_bleu_interval_is_the_percentiles_of_corpus_bleu_on_the_same_resamples():
    answers, refs = _corpus(0.5, 3)
    got = intervals.step_intervals("vqa", _rows(answers, refs), n_resamples=200, seed=5,
                                   method="draws")  # fmt: skip
    # reference: sacrebleu's corpus_bleu of each resampled corpus, the same specimen draws
    ref = sacrebleu_interval(answers, refs, n_resamples=200, seed=5)
    assert got["bleu"] == pytest.approx(ref, abs=1e-9)
    assert ref[1] - ref[0] > 5  # a real spread, not a degenerate interval


def test_bleu_needs_every_answer_and_reference():
    answers, refs = _corpus(0.5, 4, n=20)
    rows = _rows(answers, refs)
    assert "bleu" in intervals.step_intervals("vqa", rows, n_resamples=100)
    no_text = {k: v for k, v in rows.items() if k != "pred_answer"}
    assert "bleu" not in intervals.step_intervals("vqa", no_text, n_resamples=100)
    one_missing = dict(rows, ref_answers=[*refs[:-1], None])
    assert "bleu" not in intervals.step_intervals("vqa", one_missing, n_resamples=100)
    with pytest.raises(ValueError, match="BLEU needs both steps' answers"):
        intervals.compare_steps("vqa", "bleu", rows, no_text, n_resamples=100)


def test_paired_bleu_comparison_against_sacrebleu():
    # 60 specimens (< 64): resampled by drawing indices, as the reference does
    (poor, refs), (good, _) = _corpus(0.2, 6), _corpus(0.8, 6)
    got = intervals.compare_steps("vqa", "bleu", _rows(poor, refs), _rows(good, refs),
                                  n_resamples=300, seed=2)  # fmt: skip
    assert got["difference"] == pytest.approx(
        corpus_bleu(good, refs) - corpus_bleu(poor, refs), abs=1e-9
    )
    ref = sacrebleu_paired_interval(poor, good, refs, n_resamples=300, seed=2)
    assert got["ci95"] == pytest.approx(ref, abs=1e-9)
    assert got["test"].startswith("paired permutation") and got["p_value"] < 0.01
    # better / worse: specimens whose sentence BLEU (sacrebleu) rose / fell
    sentence = [
        sacrebleu.sentence_bleu(g, r).score - sacrebleu.sentence_bleu(p, r).score
        for p, g, r in zip(poor, good, refs, strict=True)
    ]
    assert got["better"] == sum(d > 1e-12 for d in sentence)
    assert got["worse"] == sum(d < -1e-12 for d in sentence)
    same = intervals.compare_steps("vqa", "bleu", _rows(poor, refs), _rows(poor, refs),
                                   n_resamples=300)  # fmt: skip
    assert same["difference"] == 0.0 and same["p_value"] == 1.0
