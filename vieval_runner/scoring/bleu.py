"""Corpus BLEU as a function of summed per-answer statistics, so that it can be resampled.

sacrebleu's ``corpus_bleu`` sums each segment's sufficient statistics (hypothesis length,
closest reference length, matched and total n-grams for n = 1..4) and turns the sums into
the score with ``BLEU.compute_bleu``; its paired bootstrap (``sacrebleu.significance``)
resamples those segment statistics. Here the statistics come from sacrebleu's public
``BLEU.sentence_score`` and the score from ``BLEU.compute_bleu`` with ``corpus_bleu``'s
defaults (13a tokenizer, mixed case, "exp" smoothing, no effective order), so the sum over
every answer gives the step's BLEU exactly (tested against ``corpus_bleu``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ORDER = 4  # sacrebleu's default maximum n-gram order
# sys_len, ref_len, matched n-grams (n = 1..4), total n-grams (n = 1..4)
N_STATS = 2 + 2 * ORDER


def sentence_bleu(
    answers: Sequence[str | None], refs: Sequence[Sequence[str]]
) -> tuple[list[float], np.ndarray]:
    """Each answer's sentence BLEU (``sacrebleu.sentence_bleu``: effective order, "exp"
    smoothing) and ``[n, 10]`` statistics (`sentence_statistics`), from one pass of sacrebleu
    (scoring a step needs both; each pass costs ~0.1 ms per answer)."""
    from sacrebleu.metrics import BLEU

    # effective_order changes only the sentence *score*, not the statistics (and with it on,
    # sentence_score does not log a warning per answer): it is sentence_bleu's default
    metric = BLEU(effective_order=True)
    scores = []
    out = np.zeros((len(answers), N_STATS), dtype=np.float64)
    for i, (answer, references) in enumerate(zip(answers, refs, strict=True)):
        got = metric.sentence_score(answer or "", list(references))
        scores.append(got.score)
        out[i] = [got.sys_len, got.ref_len, *got.counts, *got.totals]
    return scores, out


def sentence_statistics(answers: Sequence[str | None], refs: Sequence[Sequence[str]]) -> np.ndarray:
    """``[n, 10]`` per-answer statistics that ``corpus_bleu`` sums (a None answer is "", as
    in `vqa.aggregate_vqa`; each answer against its own references, which is what padding the
    reference streams with None does)."""
    return sentence_bleu(answers, refs)[1]


def corpus_scores(sums: np.ndarray) -> np.ndarray:
    """``[B]`` corpus BLEU (0-100) of ``[B, 10]`` summed statistics: ``BLEU.compute_bleu``
    with ``corpus_bleu``'s defaults, one call per row (2,000 rows in well under 0.1 s)."""
    from sacrebleu.metrics import BLEU

    ints = np.rint(np.asarray(sums, dtype=np.float64)).astype(np.int64).tolist()
    return np.array(
        [
            BLEU.compute_bleu(
                row[2 : 2 + ORDER], row[2 + ORDER :], row[0], row[1], smooth_method="exp"
            ).score
            for row in ints
        ],
        dtype=np.float64,
    )
