"""A real Delta store of short VQA answers (1-3 references each, some empty answers) at a
poor and a good step, scored by the project's scoring; and the references BLEU's interval
and paired comparison are tested against: sacrebleu's ``corpus_bleu`` of every bootstrap
resample, drawn as ``numpy.random.default_rng(seed).integers(0, n, (batch, n))`` batch by
batch (scipy's and `scoring.stats`' draws). Test-only."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vieval_runner import scoring
from vieval_runner.records import Specimen
from vieval_runner.store import commit_step, create_store, write_specimens

WORDS = ("a", "red", "blue", "green", "one", "two", "three", "the", "cat", "dog", "on", "left",
         "right", "big", "small", "sign", "stop", "go")  # fmt: skip
QUESTIONS = ("What colour is it?", "How many are there?", "Where is the sign?")
QUALITY = {0: 0.2, 100: 0.8}  # step -> share of answers close to a reference
RUN = "vqa"


def _words(rng, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(low, high + 1))))


def vqa_specimens(n: int = 60, seed: int = 0) -> list[Specimen]:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 210, 220)).save(buf, "PNG")
    return [
        Specimen(f"q{i:04d}", "vqa", QUESTIONS[i % 3], 32, 24, image_bytes=buf.getvalue(),
                 ref_answers=[_words(rng, 1, 5) for _ in range(1 + i % 3)])
        for i in range(n)
    ]  # fmt: skip


def vqa_answers(specimens: list[Specimen], quality: float, seed: int) -> list[str]:
    """A reference with a word dropped (``quality`` of the time), else random words or ""."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in specimens:
        ref = spec.ref_answers[int(rng.integers(len(spec.ref_answers)))].split()
        if rng.uniform() < quality:
            if len(ref) > 2:
                del ref[int(rng.integers(len(ref)))]
            out.append(" ".join(ref))
        else:
            out.append("" if rng.uniform() < 0.15 else _words(rng, 1, 4))
    return out


def build_vqa_stat_store(root: Path, n: int = 60, seed: int = 0) -> dict[int, list[str]]:
    """Write the store; returns each step's answers (in specimen_id order)."""
    specimens = vqa_specimens(n, seed)
    create_store(str(root))
    write_specimens(str(root), specimens, "v1")
    refs = [s.ref_answers for s in specimens]
    prompts = [s.prompt for s in specimens]
    answers = {}
    for step, quality in QUALITY.items():
        got = answers[step] = vqa_answers(specimens, quality, seed + step + 1)
        per = scoring.score_vqa(got, refs, prompts)
        agg = scoring.aggregate_vqa(per, got, refs)
        columns = {k: [d[k] for d in per] for k in per[0]}
        ci95 = scoring.step_intervals("vqa", columns | {"pred_answer": got, "ref_answers": refs})
        means = ("exact_match", "vqa_accuracy", "token_f1", "bleu", "rouge_l", "anls")
        ev = {"run_id": RUN, "step": step, "task": "vqa", "dataset_version": "v1",
              "checkpoint_path": f"ckpt-{step}", "ci95": ci95,
              **{k: agg[k] for k in (*means, "parse_failure_rate")}}  # fmt: skip
        rows = [
            {"specimen_id": s.specimen_id, "raw_text": a, "pred_answer": a, "parse_status": "ok",
             **{k: d[k] for k in (*means, "failure_category")}}
            for s, a, d in zip(specimens, got, per, strict=True)
        ]  # fmt: skip
        commit_step(str(root), ev, rows)
    return answers


def corpus_bleu(answers: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU, reference streams padded with None (as `aggregate_vqa`)."""
    import sacrebleu

    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return sacrebleu.corpus_bleu(list(answers), streams).score


def _draws(n: int, n_resamples: int, seed: int, batch: int = 250):
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, batch):
        yield from rng.integers(0, n, (min(batch, n_resamples - start), n))


def sacrebleu_interval(answers, refs, n_resamples: int, seed: int = 0) -> list[float]:
    """2.5th and 97.5th percentiles of ``corpus_bleu`` over the resampled corpora."""
    scores = [
        corpus_bleu([answers[i] for i in idx], [refs[i] for i in idx])
        for idx in _draws(len(answers), n_resamples, seed)
    ]
    return [float(v) for v in np.percentile(scores, [2.5, 97.5])]


def sacrebleu_paired_interval(answers_a, answers_b, refs, n_resamples: int, seed: int = 0):
    """The same for ``corpus_bleu(B) - corpus_bleu(A)`` on the same resampled specimens."""
    diffs = [
        corpus_bleu([answers_b[i] for i in idx], [refs[i] for i in idx])
        - corpus_bleu([answers_a[i] for i in idx], [refs[i] for i in idx])
        for idx in _draws(len(answers_a), n_resamples, seed)
    ]
    return [float(v) for v in np.percentile(diffs, [2.5, 97.5])]
