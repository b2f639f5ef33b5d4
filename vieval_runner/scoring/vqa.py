"""VQA scores: per-specimen answer metrics and the per-step aggregate."""

from __future__ import annotations

from collections import Counter

import numpy as np

from vieval_runner.scoring import bleu
from vieval_runner.scoring.categories import FAILURE_ACTIONS, vqa_category
from vieval_runner.scoring.stats import mean_present
from vieval_runner.scoring.text import (
    lcs_length,
    levenshtein,
    normalize_squad,
    normalize_vqa,
    rouge_tokens,
)

BERTSCORE_NOTE = (
    "BERTScore needs a pretrained language model; vieval never downloads one, so it is not "
    "computed."
)


def vqa_accuracy(pred: str | None, refs: list[str]) -> float | None:
    """Official VQA accuracy: min(#other refs equal to pred / 3, 1), averaged over the
    leave-one-out subsets of the references; None with fewer than 3 references."""
    if len(refs) < 3:
        return None
    p = normalize_vqa(pred)
    norm = [normalize_vqa(r) for r in refs]
    hits = sum(r == p for r in norm)
    # Leaving out reference i leaves hits - [ref i matched] matching references.
    return sum(min(1.0, (hits - (r == p)) / 3) for r in norm) / len(norm)


def answerable_refs(refs: list[str]) -> list[str]:
    """The references that say something: those normalising (SQuAD) to "" are dropped unless
    all do, then the one reference is "" (the official SQuAD 2.0 ``evaluate-v2.0.py``,
    ``get_raw_scores``: ``gold_answers = [a for a in answers if normalize_answer(a)]`` or
    ``['']``). Without this an empty prediction scores F1 1.0 against ``["a", "dog"]``."""
    kept = [r for r in refs if normalize_squad(r)]
    return kept or [""]


def squad_f1(pred: str | None, ref: str) -> float:
    """SQuAD token F1 between one prediction and one reference."""
    p, g = normalize_squad(pred).split(), normalize_squad(ref).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str | None, ref: str) -> float:
    """ROUGE-L F-measure (LCS of tokens, beta = 1), 0 when either side has no tokens."""
    p, g = rouge_tokens(pred), rouge_tokens(ref)
    lcs = lcs_length(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def anls_single(pred: str | None, ref: str, threshold: float = 0.5) -> float:
    """1 - normalized Levenshtein distance (case- and space-normalized), 0 if it is >= threshold."""
    a = " ".join((pred or "").strip().lower().split())
    b = " ".join(ref.strip().lower().split())
    length = max(len(a), len(b))
    nl = levenshtein(a, b) / length if length else 0.0
    return 1.0 - nl if nl < threshold else 0.0


def score_vqa(
    pred_answers: list[str | None],
    ref_answers: list[list[str]],
    prompts: list[str] | None = None,
    *,
    anls_threshold: float = 0.5,
    format_ratio: float = 3.0,
    good_f1: float = 0.8,
    incomplete_precision: float = 0.75,
    hallucination_min_tokens: int = 2,
    hallucination_share: float = 0.5,
    specimen_ids: list[str] | None = None,
) -> list[dict]:
    """Per-specimen VQA metrics: ``exact_match, vqa_accuracy, token_f1, bleu, rouge_l, anls,
    bertscore, failure_category, failure_action``, and ``bleu_stats`` (the answer's BLEU
    statistics, which corpus BLEU and its interval sum; not a stored column). A None
    prediction scores as ""."""
    n = len(pred_answers)
    if len(ref_answers) != n or (prompts is not None and len(prompts) != n):
        raise ValueError(
            f"score_vqa: {n} predictions, {len(ref_answers)} reference lists and "
            f"{'no' if prompts is None else len(prompts)} prompts; they must be one per specimen"
        )
    for i, refs in enumerate(ref_answers):
        if not refs:
            name = specimen_ids[i] if specimen_ids else f"#{i}"
            raise ValueError(f"score_vqa: specimen {name} has no reference answers")
    bleu_scores, bleu_stats = bleu.sentence_bleu(pred_answers, ref_answers)
    out = []
    for i, (pred, refs) in enumerate(zip(pred_answers, ref_answers, strict=True)):
        p = normalize_vqa(pred)
        gold = answerable_refs(refs)
        em = float(pred is not None and any(p == normalize_vqa(r) for r in gold))
        f1 = max(squad_f1(pred, r) for r in gold)
        category = vqa_category(
            pred,
            refs,
            None if prompts is None else prompts[i],
            f1,
            em,
            good_f1=good_f1,
            format_ratio=format_ratio,
            incomplete_precision=incomplete_precision,
            hallucination_min_tokens=hallucination_min_tokens,
            hallucination_share=hallucination_share,
        )
        out.append(
            {
                "exact_match": em,
                "vqa_accuracy": vqa_accuracy(pred, refs),
                "token_f1": f1,
                "bleu": bleu_scores[i],
                "rouge_l": max(rouge_l(pred, r) for r in refs),
                "anls": max(anls_single(pred, r, anls_threshold) for r in refs),
                "bertscore": None,
                "failure_category": category,
                "failure_action": FAILURE_ACTIONS[category],
                "bleu_stats": bleu_stats[i].tolist(),
            }
        )
    return out


def aggregate_vqa(
    per_specimen: list[dict], pred_answers: list[str | None], ref_answers: list[list[str]]
) -> dict:
    """Per-step VQA metrics: means of the per-specimen scores, corpus BLEU (sacrebleu's
    ``compute_bleu`` of the summed ``bleu_stats``, equal to ``corpus_bleu``; ``corpus_bleu``
    itself where the rows lack them), and the share of empty answers as
    ``parse_failure_rate``."""
    n = len(per_specimen)
    if not len(pred_answers) == len(ref_answers) == n:
        raise ValueError(
            f"aggregate_vqa: {n} specimens, {len(pred_answers)} predictions and "
            f"{len(ref_answers)} reference lists"
        )
    import sacrebleu  # here, not at module top: grounding-only installs need not have it

    corpus = None
    if n and all(d.get("bleu_stats") is not None for d in per_specimen):
        sums = np.sum([d["bleu_stats"] for d in per_specimen], axis=0)
        corpus = float(bleu.corpus_scores(sums[None])[0])
    elif n:
        # sacrebleu takes reference *streams*; None pads specimens with fewer references.
        width = max(len(r) for r in ref_answers)
        streams = [[r[k] if k < len(r) else None for r in ref_answers] for k in range(width)]
        corpus = sacrebleu.corpus_bleu([p or "" for p in pred_answers], streams).score
    means = ("exact_match", "vqa_accuracy", "token_f1", "rouge_l", "anls")
    return {k: mean_present([d[k] for d in per_specimen]) for k in means} | {
        "bleu": corpus,
        "parse_failure_rate": (sum(not (p or "").strip() for p in pred_answers) / n if n else None),
        "n_specimens": n,
        "bertscore": None,
        "bertscore_note": BERTSCORE_NOTE,
    }
