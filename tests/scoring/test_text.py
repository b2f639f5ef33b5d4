"""String distances of the VQA metrics against independent references: nltk's edit distance
(Levenshtein) and Google's rouge-score (tokenizer and ROUGE-L)."""

from __future__ import annotations

import random
import string

import pytest
from nltk.metrics.distance import edit_distance
from rouge_score import rouge_scorer, tokenize

from vieval_runner.scoring.text import lcs_length, levenshtein, rouge_tokens
from vieval_runner.scoring.vqa import anls_single, rouge_l

# Letters, digits, punctuation, spaces, accents, CJK, an emoji: what document answers hold.
_ALPHABET = string.ascii_letters + string.digits + " .,;:-/()'\"" + "éüßÅİ東京€" + "\U0001f600"
_WORDS = ["the", "cat", "sat", "on", "mat", "Total:", "$1,250.00", "N.Y.", "état", "2024-03-01",
          "invoice", "no.", "A", "of", "and", "東京", "it's", "x", "42"]  # fmt: skip


def random_strings(seed: int, n: int, max_len: int = 60) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, max_len)))
        # half the pairs are edits of each other (small distances), half unrelated
        if rng.random() < 0.5 and a:
            b = list(a)
            for _ in range(rng.randint(0, 5)):
                op, k = rng.random(), rng.randrange(len(b) + 1)
                if op < 0.33:
                    b.insert(k, rng.choice(_ALPHABET))
                elif b and op < 0.66:
                    del b[min(k, len(b) - 1)]
                elif b:
                    b[min(k, len(b) - 1)] = rng.choice(_ALPHABET)
            b = "".join(b)
        else:
            b = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, max_len)))
        pairs.append((a, b))
    return pairs


def random_sentences(seed: int, n: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 25)))

    return [(sentence(), sentence()) for _ in range(n)] + [("", ""), ("", "cat"), ("...", "cat")]


@pytest.mark.parametrize("seed", [0, 1])
def test_levenshtein_equals_nltk_edit_distance(seed):
    for a, b in random_strings(seed, 300):
        assert levenshtein(a, b) == edit_distance(a, b), (a, b)  # nltk: the reference


def test_levenshtein_long_document_answers():
    a = "".join(random.Random(5).choice(_ALPHABET) for _ in range(400))
    b = a[:150] + "inserted text" + a[170:]
    assert levenshtein(a, b) == edit_distance(a, b)


def test_anls_equals_definition_with_nltk_distance():
    # ANLS (Biten et al., ST-VQA): lower-cased, whitespace-collapsed, NL = dist / max(len)
    for a, b in random_strings(3, 300, max_len=20):
        p, r = " ".join(a.strip().lower().split()), " ".join(b.strip().lower().split())
        length = max(len(p), len(r))
        nl = edit_distance(p, r) / length if length else 0.0
        assert anls_single(a, b) == (1 - nl if nl < 0.5 else 0.0), (a, b)


@pytest.mark.parametrize("seed", [0, 1])
def test_rouge_tokens_equal_rouge_score_tokenizer(seed):
    for a, b in random_sentences(seed, 200) + random_strings(seed, 200):
        assert rouge_tokens(a) == tokenize.tokenize(a, None), a
        assert rouge_tokens(b) == tokenize.tokenize(b, None), b


@pytest.mark.parametrize("seed", [0, 1])
def test_rouge_l_equals_rouge_score_on_a_corpus(seed):
    """The project keeps its tokenizer (one regex) and takes the LCS from rapidfuzz: equal to
    Google's rouge-score, which is pure Python and pulls nltk and absl at run time."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for pred, ref in random_sentences(seed, 300):
        expected = scorer.score(ref, pred)["rougeL"].fmeasure  # score(target, prediction)
        assert rouge_l(pred, ref) == pytest.approx(expected, abs=1e-12), (pred, ref)


def test_lcs_length_of_token_lists():
    assert lcs_length(["a", "b", "c", "d"], ["b", "d", "a"]) == 2
    assert lcs_length([], ["a"]) == 0
    # tokens are compared whole, not character by character
    assert lcs_length(["ab", "c"], ["a", "bc"]) == 0
