"""Text normalizations and string distances used by the VQA metrics.

Three normalizations exist on purpose, one per reference implementation we must agree with:
``normalize_vqa`` (official VQAv2 ``vqaEval.py``), ``normalize_squad`` (SQuAD ``evaluate-v2.0``
token F1) and ``rouge_tokens`` (Google ``rouge-score`` default tokenizer). They are hand-written
because no maintained package ships them (the official scripts are not packages; rouge-score's
tokenizer is one regex, tested equal on a corpus, and importing it would pull nltk and absl).
The distances are rapidfuzz's (C++): Levenshtein for ANLS and the LCS of token lists
(``LCSseq``) for ROUGE-L.
"""

from __future__ import annotations

import re
import string

from rapidfuzz.distance import LCSseq, Levenshtein

# The official VQAv2 contraction table, kept verbatim (including its quirks, e.g. the
# capitalised keys can never match because words are lower-cased before the lookup).
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!")  # fmt: skip
# A period is dropped unless a digit follows it ("3.5" survives, "dog." does not).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def _vqa_punctuation(text: str) -> str:
    # Official rule: a mark touching a space (or any text with a "1,000"-style number) is
    # deleted; otherwise it becomes a space ("black/white" -> "black white"). The test looks
    # at the original text, not the progressively edited one.
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        if f"{p} " in text or f" {p}" in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _VQA_ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa(text: str | None) -> str:
    """Official VQAv2 answer normalization: whitespace, punctuation, number words, articles,
    contractions (``"Two."`` -> ``"2"``, ``"the dog"`` -> ``"dog"``, ``"dont"`` -> ``"don't"``)."""
    if text is None:
        return ""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


_SQUAD_PUNCT = frozenset(string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_squad(text: str | None) -> str:
    """SQuAD answer normalization: lower case, drop punctuation, articles, extra whitespace."""
    if text is None:
        return ""
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCT)
    return " ".join(_SQUAD_ARTICLES.sub(" ", text).split())


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str | None) -> list[str]:
    """Tokens as ``rouge-score``'s default tokenizer makes them (lower case, alphanumeric runs)."""
    if not text:
        return []
    return _NON_ALNUM.sub(" ", text.lower()).split()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; all cost 1): rapidfuzz ``Levenshtein``."""
    return Levenshtein.distance(a, b)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists: rapidfuzz ``LCSseq``."""
    return LCSseq.similarity(a, b)
