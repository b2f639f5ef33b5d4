"""The coordinate-frame check and the generation's truncated verdict, through parse, score,
store, rescore and summary (a real Delta store)."""

from __future__ import annotations

import json

from rich.console import Console

from vieval_runner import parsing, report, store
from vieval_runner.config import config_from_dict, dump_config
from vieval_runner.pipeline import rescore, results
from vieval_runner.records import Box
from vieval_runner.testing.fixtures import make_specimens


def _step(tmp_path):
    """Qwen2.5-VL-style answers (pixels of a half-size input) parsed as qwen3_vl_json."""
    specimens = make_specimens()
    predictions = []
    for k, spec in enumerate(specimens):
        w, h = spec.width, spec.height
        spec.ref_boxes = [Box(0, 0, w / 2, h / 2), Box(w / 2, h / 2, w, h)]
        iw, ih = w // 2, h // 2
        boxes = [[0, 0, iw / 2, ih / 2], [iw / 2, ih / 2, iw, ih]]
        text = json.dumps([{"bbox_2d": b, "label": spec.prompt} for b in boxes])
        if k == 0:
            text = text[:-1] + "{" + text[-1]  # a stray brace in a complete output
        cut = k == 1
        predictions.append(
            results.parse_text(
                spec, text, (iw, ih), "qwen3_vl_json", None, truncated=cut if k < 2 else False
            )
        )
    return specimens, predictions


def test_resized_pixels_read_as_0_1000_are_reported_with_the_setting_that_fixes_them(tmp_path):
    specimens, predictions = _step(tmp_path)
    assert predictions[0].parse_status == "malformed"  # complete text, stray brace
    assert predictions[1].parse_status == "truncated"  # the generation hit max_new_tokens
    columns = results.frame_columns(specimens, predictions, "qwen3_vl_json", None)
    assert columns["coords_best_fit"] == "input_pixel"
    assert columns["coords_best_fit_f1"] > 0.9
    advice = columns["coords_advice"]
    assert "input_pixel" in advice and "output_format=qwen25_vl_json" in advice
    # read in the right frame, the check stays silent
    right = [
        results.parse_text(s, p.raw_text, p.input_size, "qwen25_vl_json", None, truncated=False)
        for s, p in zip(specimens, predictions, strict=True)
    ]
    quiet = results.frame_columns(specimens, right, "qwen25_vl_json", None)
    assert quiet["coords_best_fit"] == "input_pixel" and quiet["coords_advice"] is None
    # plain_xyxy names its coords setting; token formats and VQA have no frame to check
    assert parsing.frame_setting("plain_xyxy", "normalized_1") == "coords=normalized_1"
    assert results.frame_columns(specimens, predictions, "paligemma_loc", None) == {}


def test_frame_check_and_truncated_survive_store_rescore_and_summary(tmp_path):
    specimens, predictions = _step(tmp_path)
    root = str(tmp_path / "store")
    config = config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "base_model": str(tmp_path / "base"),
            "store": root,
            "task": "grounding",
            "data": {"path": str(tmp_path)},
            "device": "cpu",
            "output_format": "qwen3_vl_json",
        }
    )
    aggregates = results.score_predictions(config, specimens, predictions, device="cpu")
    store.create_store(root)
    store.write_specimens(root, specimens, "v1")
    eval_row = {
        "eval_id": "e1",
        "run_id": "r",
        "step": 100,
        "status": "ok",
        "task": "grounding",
        "config": json.dumps(dump_config(config)),
        "output_format": "qwen3_vl_json",
        "parser_version": parsing.PARSER_VERSION,
        "dataset_version": "v1",
        **{k: v for k, v in aggregates.items() if k in store.AGGREGATE_METRICS},
        **results.frame_columns(specimens, predictions, "qwen3_vl_json", None),
    }
    store.commit_step(root, eval_row, results.prediction_rows("r", 100, "e1", predictions))
    rows = {r["specimen_id"]: r for r in store.open_store(root).step("r", 100).to_pylist()}
    assert [rows[s.specimen_id]["truncated"] for s in specimens[:3]] == [False, True, False]

    rescore.rescore_store(root, console=Console(quiet=True))
    reader = store.open_store(root)
    again = {r["specimen_id"]: r for r in reader.step("r", 100).to_pylist()}
    assert again[specimens[0].specimen_id]["parse_status"] == "malformed"
    assert again[specimens[1].specimen_id]["parse_status"] == "truncated"
    latest = reader.evaluations("r").to_pylist()[-1]
    assert latest["coords_best_fit"] == "input_pixel" and latest["coords_advice"]

    (summary,) = report.summarize(reader, "r")
    assert "output_format=qwen25_vl_json" in summary["coords_advice"]
    console = Console(record=True, width=250)
    report.print_summary([summary], console)
    lines = [line for line in console.export_text().splitlines() if "coordinate frame" in line]
    assert len(lines) == 1 and "(step 100)" in lines[0]
