"""The loop end to end on real tiny models: scripted outputs through generate -> parse,
a run into a real Delta store, resume, failed checkpoints, rescore."""

from __future__ import annotations

import json
import shutil

import pytest
from rich.console import Console

from vieval_runner import parsing, scoring, store
from vieval_runner.config import config_from_dict
from vieval_runner.families import FAMILIES
from vieval_runner.generate import batches as generation
from vieval_runner.generate.options import GenerateOptions
from vieval_runner.model import loading as models
from vieval_runner.model.swap import swap_weights
from vieval_runner.pipeline import rescore
from vieval_runner.pipeline import run as runner
from vieval_runner.prepare.inputs import prepare
from vieval_runner.records import Box, Specimen
from vieval_runner.testing.fixtures import (
    make_specimens,
    quiet_console,
    run_config,
    target_box,
)


def _scripted(family: str, spec: Specimen, input_size) -> str:
    """The answer a perfect model of ``family`` gives for the target box of ``spec``."""
    w, h = spec.width, spec.height
    x1, y1, x2, y2 = target_box(w, h)
    if family == "qwen2_vl":
        rel = [round(v) for v in (x1 / w * 1000, y1 / h * 1000, x2 / w * 1000, y2 / h * 1000)]
        return (
            f"<|object_ref_start|>{spec.prompt}<|object_ref_end|>"
            f"<|box_start|>({rel[0]},{rel[1]}),({rel[2]},{rel[3]})<|box_end|>"
        )
    if family == "qwen25_vl":
        iw, ih = input_size
        box = [round(x1 * iw / w), round(y1 * ih / h), round(x2 * iw / w), round(y2 * ih / h)]
        return f'```json\n[{{"bbox_2d": {json.dumps(box)}, "label": "{spec.prompt}"}}]\n```'
    if family == "qwen3_vl":
        rel = [round(v) for v in (x1 / w * 1000, y1 / h * 1000, x2 / w * 1000, y2 / h * 1000)]
        return json.dumps([{"bbox_2d": rel, "label": spec.prompt}])
    assert family == "paligemma"
    locs = [round(y1 / h * 1024), round(x1 / w * 1024), round(y2 / h * 1024), round(x2 / w * 1024)]
    return "".join(f"<loc{v:04d}>" for v in locs) + f" {spec.prompt}"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen25_vl", "qwen3_vl", "paligemma"])
def test_scripted_answers_parse_to_original_pixels(tiny_run, family):
    """Scripted answers go through the real generate + decode path, then the family's parser
    must give the original-image pixel box back (within the format's quantization)."""
    run = tiny_run(family)
    loaded = models.load_base(run.base_model_dir, device="cpu")
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    specimens = make_specimens()
    prepared = prepare(loaded, specimens)
    texts = [_scripted(family, s, p.input_size) for s, p in zip(specimens, prepared, strict=True)]
    outputs = generation.generate(
        loaded, prepared, batch_size=4, max_new_tokens=80, forced_texts=texts
    )
    fmt = FAMILIES[family]["output_format"]
    for spec, prep, out in zip(specimens, prepared, outputs, strict=True):
        result = parsing.parse_grounding(
            out.text, fmt, (spec.width, spec.height), input_size=out.input_size
        )
        assert result.status == "ok", (family, out.text)
        assert len(result.boxes) == 1
        got = result.boxes[0].as_list()
        want = target_box(spec.width, spec.height)
        if family == "qwen25_vl":
            tolerance = max(spec.width / prep.input_size[0], spec.height / prep.input_size[1])
        else:
            tolerance = max(spec.width, spec.height) / 1000 + 0.01
        assert got == pytest.approx(want, abs=tolerance), (family, out.text, got, want)


def test_run_writes_every_step_and_resumes(tmp_path, tiny_run):
    run = tiny_run("qwen25_vl")
    config = run_config(tmp_path, run)
    outcome = runner.run(config, quiet_console())
    assert outcome.evaluated == [0, 100, 200, 300]
    assert outcome.exit_status == 0

    reader = store.open_store(config.store)
    assert reader.runs() == [config.effective_run_id]
    assert reader.steps(config.effective_run_id) == [0, 100, 200, 300]
    evaluations = reader.evaluations(config.effective_run_id).to_pylist()
    assert [e["status"] for e in evaluations] == ["ok"] * 4
    assert {e["parser_version"] for e in evaluations} == {parsing.PARSER_VERSION}
    assert {e["model_family"] for e in evaluations} == {"qwen25_vl"}
    step = reader.step(config.effective_run_id, 200).to_pylist()
    assert len(step) == 6
    for row in step:
        assert row["parse_status"] in parsing_statuses()
        assert row["failure_category"]
        assert row["failure_action"] == scoring.FAILURE_ACTIONS[row["failure_category"]]
        assert row["tp"] + row["fn"] == 1  # one reference box each
    # checkpoints generate different text (weights really swapped)
    texts = {
        s: tuple(r["raw_text"] for r in reader.step(config.effective_run_id, s).to_pylist())
        for s in (0, 100, 200, 300)
    }
    assert len(set(texts.values())) > 1

    again = runner.run(config, quiet_console())
    assert again.evaluated == [] and again.skipped == [0, 100, 200, 300]
    forced = runner.run(config.model_copy(update={"force": True}), quiet_console())
    assert forced.evaluated == [0, 100, 200, 300]
    # steps=[...] re-evaluates on demand even without force
    chosen = runner.run(config.model_copy(update={"steps": [200]}), quiet_console())
    assert chosen.evaluated == [200]


def parsing_statuses() -> set[str]:
    from vieval_runner.records import PARSE_STATUSES

    return set(PARSE_STATUSES)


def test_corrupt_checkpoint_is_a_failed_evaluation_and_the_run_goes_on(tmp_path, tiny_run):
    source = tiny_run("paligemma")
    run_dir = tmp_path / "run"
    shutil.copytree(source.run_dir, run_dir)
    weights = run_dir / "checkpoint-200" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run = type(source)(source.base_model_dir, run_dir, source.steps, source.family)
    config = run_config(tmp_path, run)
    outcome = runner.run(config, quiet_console())
    assert outcome.exit_status == 3
    assert set(outcome.failed) == {200}
    assert "checkpoint-200" in outcome.failed[200]
    assert outcome.evaluated == [0, 100, 300]
    reader = store.open_store(config.store)
    failed = [e for e in reader.evaluations().to_pylist() if e["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["step"] == 200 and failed[0]["error"]
    assert reader.steps(config.effective_run_id) == [0, 100, 300]


def test_vqa_run_and_rescore(tmp_path, tiny_run):
    run = tiny_run("paligemma")
    config = run_config(tmp_path, run, task="vqa", steps=[0, 300])
    outcome = runner.run(config, quiet_console())
    assert outcome.evaluated == [0, 300]
    reader = store.open_store(config.store)
    rows = reader.step(config.effective_run_id, 300).to_pylist()
    assert all(r["exact_match"] in (0.0, 1.0) for r in rows)
    assert all(r["token_f1"] is not None for r in rows)
    before = reader.version["predictions"]

    done = rescore.rescore_store(config.store, console=quiet_console())
    assert sorted(done) == [(config.effective_run_id, 0), (config.effective_run_id, 300)]
    reader = store.open_store(config.store)
    # both rescored steps in one predictions commit, each marker pointing at that version
    assert reader.version["predictions"] == before + 1
    markers = reader.committed(config.effective_run_id)
    assert {markers[s]["predictions_version"] for s in (0, 300)} == {before + 1}
    rescored = reader.step(config.effective_run_id, 300).to_pylist()
    assert [r["raw_text"] for r in rescored] == [r["raw_text"] for r in rows]
    assert [r["exact_match"] for r in rescored] == [r["exact_match"] for r in rows]
    evaluations = reader.evaluations(config.effective_run_id).to_pylist()
    assert len(evaluations) == 4 and all(e["status"] == "ok" for e in evaluations)
    # every evaluation (run and rescore) stores BLEU's interval with the others: sacrebleu's
    # corpus BLEU of each resample of the step's answers (few specimens: drawn as indices).
    # The tiny model's answers match nothing (BLEU 0); test_results.py checks a real spread
    from vieval_runner.testing.vqa_stat_store import corpus_bleu, sacrebleu_interval

    refs = {r["specimen_id"]: r["ref_answers"] for r in reader.specimens().to_pylist()}
    for e in evaluations:
        step = reader.step(config.effective_run_id, e["step"]).to_pylist()
        answers = [r["pred_answer"] or "" for r in step]
        their = [refs[r["specimen_id"]] for r in step]
        ci95 = json.loads(e["ci95"])
        assert set(ci95) == {"exact_match", "vqa_accuracy", "token_f1", "bleu", "rouge_l", "anls"}
        assert e["bleu"] == pytest.approx(corpus_bleu(answers, their), abs=1e-9)
        assert ci95["bleu"] == pytest.approx(sacrebleu_interval(answers, their, 2000), abs=1e-9)


def test_lora_run_uses_the_base_processor_and_says_so_once(tmp_path, tiny_lora_run):
    run = tiny_lora_run("qwen2_vl")
    config = run_config(tmp_path, run)
    console = Console(record=True, width=200)
    outcome = runner.run(config, console)
    assert outcome.evaluated == [0, 100, 200, 300] and outcome.exit_status == 0
    text = console.export_text()
    assert text.count("has no processor files: using the base model's processor") == 1
    reader = store.open_store(config.store)
    by_step = {
        s: [r["raw_text"] for r in reader.step(config.effective_run_id, s).to_pylist()]
        for s in (0, 100, 200, 300)
    }
    assert len({tuple(v) for v in by_step.values()}) > 1  # the adapters change the output


def test_vqa_from_a_hf_dataset_with_a_chat_family(tmp_path, tiny_run):
    """Qwen2.5-VL (chat template, system prompt) on a `datasets` dataset saved to disk."""
    import datasets

    specimens = make_specimens("vqa")[:5]
    table = {
        "qid": [f"q{i}" for i in range(5)],
        "picture": [{"bytes": s.image_bytes, "path": None} for s in specimens],
        "question": [s.prompt for s in specimens],
        "answers": [["red", "a red one", "red"]] * 5,
    }
    features = datasets.Features(
        {
            "qid": datasets.Value("string"),
            "picture": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
        }
    )
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "hf"))
    run = tiny_run("qwen25_vl")
    config = config_from_dict(
        {
            "run_dir": str(run.run_dir),
            "base_model": str(run.base_model_dir),
            "store": str(tmp_path / "store"),
            "task": "vqa",
            "data": {
                "path": str(tmp_path / "hf"),
                "format": "hf",
                "columns": {
                    "id": "qid",
                    "image": "picture",
                    "prompt": "question",
                    "answers": "answers",
                },
            },
            "steps": [0, 200],
            "system_prompt": "Answer with one word.",
            "max_new_tokens": 8,
            "device": "cpu",
        }
    )
    assert runner.run(config, quiet_console()).evaluated == [0, 200]
    reader = store.open_store(config.store)
    assert sorted(r["specimen_id"] for r in reader.specimens().to_pylist()) == [
        f"q{i}" for i in range(5)
    ]
    rows = reader.step(config.effective_run_id, 200).to_pylist()
    assert all(r["vqa_accuracy"] is not None and r["failure_category"] for r in rows)
    aggregates = reader.aggregates(config.effective_run_id).to_pylist()
    assert [a["step"] for a in aggregates] == [0, 200]
    assert all(a["exact_match"] is not None and a["bleu"] is not None for a in aggregates)


def test_box_scores_from_token_log_probabilities_enable_ap(tiny_run, tmp_path):
    """Scripted answers: forced tokens have probability 1, so confidence is exactly 1.0; free
    generation gives a confidence in (0, 1); scored boxes make AP computable."""
    from vieval_runner import scoring
    from vieval_runner.pipeline import results

    run = tiny_run("qwen25_vl")
    loaded = models.load_base(run.base_model_dir, device="cpu")
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    specimens = make_specimens()[:4]
    for spec in specimens:
        spec.ref_boxes = [Box(*target_box(spec.width, spec.height), label=spec.prompt)]
    prepared = prepare(loaded, specimens)
    texts = [
        _scripted("qwen25_vl", s, p.input_size) for s, p in zip(specimens, prepared, strict=True)
    ]
    options = GenerateOptions(scores=True)
    forced = generation.generate(
        loaded, prepared, batch_size=4, max_new_tokens=80, forced_texts=texts, options=options
    )
    assert [g.confidence for g in forced] == [1.0] * 4
    free = generation.generate(loaded, prepared, batch_size=4, max_new_tokens=8, options=options)
    assert all(g.confidence is not None and 0.0 < g.confidence < 1.0 for g in free)
    plain = generation.generate(loaded, prepared, batch_size=4, max_new_tokens=8)
    assert [g.text for g in plain] == [g.text for g in free]  # scoring changes no output
    assert all(g.confidence is None for g in plain)

    predictions = [
        results.parse_text(s, g.text, g.input_size, "qwen25_vl_json", None, confidence=g.confidence)
        for s, g in zip(specimens, forced, strict=True)
    ]
    assert all(b.score == 1.0 for p in predictions for b in p.pred_boxes)
    statuses = [p.parse_status for p in predictions]
    pred_boxes = [p.pred_boxes for p in predictions]
    ref_boxes = [s.ref_boxes for s in specimens]
    per = scoring.score_grounding(pred_boxes, ref_boxes, statuses)
    aggregates = scoring.aggregate_grounding(
        per, statuses, pred_boxes=pred_boxes, ref_boxes=ref_boxes
    )
    assert aggregates["ap50"] == pytest.approx(1.0) and aggregates["ap"] is not None


def test_box_scores_reach_the_store_and_survive_rescore(tmp_path, tiny_run):
    run = tiny_run("qwen25_vl")
    config = run_config(tmp_path, run, box_scores=True, steps=[200])
    runner.run(config, quiet_console())
    rows = store.open_store(config.store).step(config.effective_run_id, 200).to_pylist()
    assert all(0.0 < r["confidence"] <= 1.0 for r in rows)
    for r in rows:  # per-token columns for per-box scores (re-derived by rescore)
        assert len(r["token_logprobs"]) == len(r["token_ends"]) > 0
        assert r["token_ends"][-1] == len(r["raw_text"])
        assert all(0.0 < b["score"] <= 1.0 for b in r["pred_boxes"])
    rescore.rescore_store(config.store, console=quiet_console())
    again = store.open_store(config.store).step(config.effective_run_id, 200).to_pylist()
    assert [r["confidence"] for r in again] == [r["confidence"] for r in rows]
    assert [r["token_logprobs"] for r in again] == [r["token_logprobs"] for r in rows]
    assert [r["pred_boxes"] for r in again] == [r["pred_boxes"] for r in rows]


def test_an_image_that_does_not_decode_stops_the_run_naming_it(tmp_path, tiny_run):
    """A truncated file passes the header check on load and fails to decode when the split is
    prepared: one error naming the specimen and file, not a failed evaluation per step."""
    from vieval_runner.data import DataError

    config = run_config(tmp_path, tiny_run("qwen2_vl"))
    first = json.loads((tmp_path / "data" / "val.jsonl").read_text().splitlines()[0])
    image = tmp_path / "data" / first["image"]
    image.write_bytes(image.read_bytes()[:120])
    with pytest.raises(DataError) as caught:
        runner.run(config, quiet_console())
    message = str(caught.value)
    assert f"specimen {first['id']!r}: cannot load image" in message and str(image) in message
    assert store.open_store(config.store).evaluations().num_rows == 0  # no step marked failed


def test_no_room_for_the_prepared_split_stops_the_run_with_one_error(
    tmp_path, tiny_run, monkeypatch
):
    """Preparing would spill more than the disk holds: one DataError naming the folder before
    any step runs, not a failed evaluation per step (and not a full disk)."""
    import collections

    from vieval_runner.data import DataError
    from vieval_runner.prepare import ram_budget as prepared_cache

    usage = collections.namedtuple("usage", "total used free")
    real = prepared_cache.shutil.disk_usage
    scratch = str(tmp_path / "scratch")

    def nearly_full(path):  # only the spill folder's disk is full, not the store's
        return usage(10**12, 0, 10) if str(path).startswith(scratch) else real(path)

    monkeypatch.setattr(prepared_cache.shutil, "disk_usage", nearly_full)
    config = run_config(
        tmp_path, tiny_run("qwen2_vl"), prepare_cache_ram_mb=0, reuse_prepared=False,
        cache_dir=str(tmp_path / "scratch"),
    )  # fmt: skip
    with pytest.raises(DataError, match="on disk beyond the 0 MB held in RAM") as caught:
        runner.run(config, quiet_console())
    assert str(tmp_path / "scratch") in str(caught.value)
    assert store.open_store(config.store).evaluations().num_rows == 0
