"""The summary printed after a run and by `vieval summary`: best step, ties, overfitting."""

from __future__ import annotations

from rich.console import Console

from vieval_runner import scoring
from vieval_runner.report import print_summary


def _summary(f1_by_step: dict[int, float]) -> dict:
    by_step = {s: {"step": s, "f1": v, "n_specimens": 4} for s, v in f1_by_step.items()}
    return {
        "run_id": "run", "task": "grounding", "metric": "f1",
        "steps": [by_step[s] for s in sorted(by_step)], "failed": [],
        "best_step": scoring.best_step(by_step, "f1"),
        "overfitting": scoring.overfitting_signal(by_step, "f1"), "notes": {},
    }  # fmt: skip


def _printed(summary: dict) -> str:
    console = Console(record=True, width=140)
    print_summary([summary], console)
    return console.export_text()


def test_the_best_step_is_marked_and_an_earlier_peak_is_a_signal():
    text = _printed(_summary({0: 0.1, 100: 0.8, 200: 0.6}))
    assert "100 *" in text and "best checkpoint: step 100 by f1 (marked *)" in text
    assert "overfitting signal: step 100 scored 0.800 f1, the last step 200 only 0.600" in text


def test_a_tie_of_every_step_names_no_best_checkpoint():
    text = _printed(_summary({0: 0.0, 100: 0.0, 200: 0.0}))
    assert "*" not in text and "best checkpoint: step" not in text
    assert "no best checkpoint: every step scores 0.000 f1" in text


def test_one_step_is_the_best_there_is():
    text = _printed(_summary({300: 0.0}))
    assert "best checkpoint: step 300 by f1" in text


def test_summary_intervals_significance_and_80_columns(tmp_path):
    from vieval_runner import store
    from vieval_runner.report import summarize
    from vieval_runner.testing.stat_stores import build_stat_store

    build_stat_store(tmp_path / "st")
    (summary,) = summarize(store.open_store(str(tmp_path / "st")))
    for row in summary["steps"]:
        for metric in ("f1", "precision", "recall", "acc_at_50", "ap50", "ap"):
            low, high = row[f"{metric}_ci95"]
            assert low <= row[metric] <= high, (row["step"], metric)
    # steps 200 and 300 hit 80% and 81% of the time: the best is no better than the next,
    # and far better than step 0 (hits 20%)
    evidence = summary["best_evidence"]
    assert summary["best_step"] in (200, 300)
    assert not evidence["vs_next"]["significant"] and evidence["vs_first"]["significant"]
    console = Console(record=True, width=80)
    print_summary([summary], console)
    text = console.export_text()
    assert "…" not in text
    for header in ("step", "F1", "95% CI", "P", "R", "acc@.5", "AP50", "unparsed"):
        assert f" {header} " in text.splitlines()[2] + " ", header
    assert "not significantly better than the next best" in text
    assert "significantly better than the first step" in text


def test_vqa_summary_bleu_interval_stored_or_recomputed_from_the_answers(tmp_path, monkeypatch):
    import json

    import pytest

    from vieval_runner import evidence, store
    from vieval_runner.report import summarize
    from vieval_runner.testing.vqa_stat_store import (
        build_vqa_stat_store,
        corpus_bleu,
        sacrebleu_interval,
        vqa_specimens,
    )

    answers = build_vqa_stat_store(tmp_path / "st")
    refs = [s.ref_answers for s in vqa_specimens()]
    reader = store.open_store(str(tmp_path / "st"))
    stored = {e["step"]: json.loads(e["ci95"])["bleu"] for e in reader.evaluations().to_pylist()}
    (recomputed,) = summarize(reader, n_resamples=300, seed=4)
    for row in recomputed["steps"]:
        got = answers[row["step"]]
        assert row["bleu"] == pytest.approx(corpus_bleu(got, refs), abs=1e-9)
        # reference: sacrebleu's corpus BLEU of each resample, from the stored answer text and
        # the specimens' references (the stored interval used other settings)
        ref = sacrebleu_interval(got, refs, n_resamples=300, seed=4)
        assert row["bleu_ci95"] == pytest.approx(ref, abs=1e-9)

    # at the settings the evaluation stored its interval with, it is taken as stored: no
    # answer is read again
    def unread(*args, **kwargs):
        raise AssertionError("reference answers read although the stored interval fits")

    monkeypatch.setattr(evidence, "reference_answers", unread)
    (summary,) = summarize(reader)
    assert {row["step"]: row["bleu_ci95"] for row in summary["steps"]} == stored
    assert all(row["token_f1_ci95"][0] < row["token_f1"] for row in summary["steps"])
