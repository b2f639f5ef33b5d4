"""`vieval summary --by`: slices by COCO area range, label and metadata, with n and intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

from vieval_runner import breakdown, store
from vieval_runner.records import Box
from vieval_runner.testing.stat_stores import build_stat_store, cocoeval_precision


@pytest.fixture(scope="module")
def stat_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bd") / "st"
    specimens = build_stat_store(root, n=150)
    return root, specimens


def test_size_ap_equals_pycocotools_area_ranges(stat_store):
    root, specimens = stat_store
    reader = store.open_store(str(root))
    rows = breakdown.breakdown(reader, "size", steps=[100], n_resamples=200)
    assert [r["slice"] for r in rows] == ["small", "medium", "large"]
    table = reader.step("run", 100)
    preds = [[Box.from_row(b) for b in bs] for bs in table.column("pred_boxes").to_pylist()]
    by_id = {s.specimen_id: s.ref_boxes for s in specimens}
    refs = [by_id[i] for i in table.column("specimen_id").to_pylist()]
    # reference: COCOeval with its default areaRng on the same boxes and scores
    prec = cocoeval_precision(preds, refs)
    for a, row in enumerate(rows, start=1):
        p = prec[:, :, a]
        assert row["ap"] == pytest.approx(p[p > -1].mean(), abs=1e-6), row["slice"]
        assert row["ap50"] == pytest.approx(p[0].mean(), abs=1e-6), row["slice"]
        assert row["ap_ci95"][0] <= row["ap"] <= row["ap_ci95"][1]
    assert sum(r["n"] for r in rows) == 150
    # specimen slices: every 3rd specimen has a small / medium / large reference box
    assert [r["n"] for r in rows] == [50, 50, 50]


def test_label_and_metadata_slices_carry_n_and_intervals(stat_store):
    root, _ = stat_store
    reader = store.open_store(str(root))
    rows = breakdown.breakdown(reader, "source", steps=[200], n_resamples=300)
    assert {r["slice"]: r["n"] for r in rows} == {"phone": 75, "web": 75}
    for r in rows:
        assert set(r) >= {"by", "slice", "step", "n", "f1", "f1_ci95", "acc_at_50_ci95"}
        assert r["f1_ci95"][0] <= r["f1"] <= r["f1_ci95"][1]
    labels = breakdown.breakdown(reader, "label", steps=[200], n_resamples=300)
    assert sorted(r["slice"] for r in labels) == ["car", "cat", "dog"]
    tiny = [r for r in labels if r["slice"] == "car"][0]
    width = tiny["f1_ci95"][1] - tiny["f1_ci95"][0]
    whole = breakdown.breakdown(reader, "source", steps=[200], n_resamples=300)[0]
    assert width > 0.1 and whole["n"] > tiny["n"]  # a smaller slice, a wider interval
    with pytest.raises(store.StoreError, match="no specimen has a field 'colour'.*source"):
        breakdown.breakdown(reader, "colour")


def test_breakdown_table_fits_80_columns(stat_store):
    root, _ = stat_store
    rows = breakdown.breakdown(store.open_store(str(root)), "size", steps=[0], n_resamples=200)
    console = Console(record=True, width=80)
    breakdown.print_breakdown(rows, "size", console)
    text = console.export_text()
    assert "…" not in text and "small" in text and "F1" in text
    assert json.loads(json.dumps(rows))  # --json is plain JSON


def test_size_slice_of_a_specimen_follows_coco_area_ranges():
    assert breakdown.size_of([Box(0, 0, 31, 33)]) == "small"  # 1023 < 32^2
    assert breakdown.size_of([Box(0, 0, 32, 32)]) == "medium"
    assert breakdown.size_of([Box(0, 0, 96, 96)]) == "large"
    assert breakdown.size_of([]) == "none"
    assert np.isclose(32.0**2, 1024)


def test_vqa_breakdown_by_question_word_and_tiny_compare(tmp_path):
    from scipy.stats import binomtest

    from vieval_runner import evidence
    from vieval_runner.testing.stores import make_vqa_store

    reader = store.open_store(str(make_vqa_store(tmp_path / "vqa")))
    rows = breakdown.breakdown(reader, "label", steps=[100], n_resamples=200)
    # questions "What colour ...", "How many ...", "What is ...": sliced by their first word
    assert {r["slice"]: r["n"] for r in rows} == {"How": 1, "What": 2}
    what = next(r for r in rows if r["slice"] == "What")
    assert what["exact_match"] == 0.5 and what["exact_match_ci95"] == [0.0, 1.0]
    got = evidence.compare(reader, "vqa", "vqa-run", 0, "vqa-run", 100, "exact_match")
    # step 0 answers none exactly, step 100 two of three: McNemar on 2 discordant pairs
    assert (got["better"], got["worse"], got["unchanged"], got["n"]) == (2, 0, 1, 3)
    assert got["p_value"] == binomtest(2, 2, 0.5).pvalue == 0.5  # tiny n: never significant


def test_vqa_bleu_per_slice_and_paired_bleu_against_sacrebleu(tmp_path):
    from vieval_runner import evidence
    from vieval_runner.testing.vqa_stat_store import (
        build_vqa_stat_store,
        corpus_bleu,
        sacrebleu_interval,
        sacrebleu_paired_interval,
        vqa_specimens,
    )

    answers = build_vqa_stat_store(tmp_path / "st")
    specimens = vqa_specimens()
    refs = [s.ref_answers for s in specimens]
    reader = store.open_store(str(tmp_path / "st"))
    rows = breakdown.breakdown(reader, "label", steps=[100], n_resamples=200)
    assert {r["slice"]: r["n"] for r in rows} == {"How": 20, "What": 20, "Where": 20}
    for r in rows:  # reference: sacrebleu on the slice's answers and their resamples
        idx = [i for i, s in enumerate(specimens) if s.prompt.startswith(r["slice"] + " ")]
        got, their = [answers[100][i] for i in idx], [refs[i] for i in idx]
        assert r["bleu"] == pytest.approx(corpus_bleu(got, their), abs=1e-9)
        assert r["bleu_ci95"] == pytest.approx(sacrebleu_interval(got, their, 200), abs=1e-9)

    got = evidence.compare(reader, "vqa", "vqa", 0, "vqa", 100, "bleu", n_resamples=300)
    difference = corpus_bleu(answers[100], refs) - corpus_bleu(answers[0], refs)
    assert got["difference"] == pytest.approx(difference, abs=1e-9)
    paired = sacrebleu_paired_interval(answers[0], answers[100], refs, 300)
    assert got["ci95"] == pytest.approx(paired, abs=1e-9)
    assert got["p_value"] < 0.05 and got["better"] > got["worse"]
