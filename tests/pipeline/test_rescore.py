"""`vieval rescore` (`pipeline/rescore.py`): stored raw text parsed and scored again, several
steps per commit, on a real Delta store."""

from __future__ import annotations

import io
import json
import math

import pytest
from PIL import Image
from rich.console import Console

from vieval_runner import store
from vieval_runner.config import config_from_dict, dump_config
from vieval_runner.pipeline import rescore
from vieval_runner.records import Box, Prediction, Specimen

STEPS = (100, 200, 300, 400, 500)
# (id, width, height, reference box in pixels)
SPECIMENS = [("a", 640, 480, (64, 96, 192, 192)), ("b", 1000, 500, (100, 50, 400, 250))]


def _raw_text(step: int, width: int, height: int, ref: tuple) -> str:
    """Qwen3-VL JSON: ``bbox_2d`` on a 0-1000 grid of the image (Qwen3-VL's grounding
    convention), the box drifting right as the step grows less."""
    shift = 2000 // step
    x1, y1, x2, y2 = ref
    grid = [x1 * 1000 / width + shift, y1 * 1000 / height, x2 * 1000 / width + shift,
            y2 * 1000 / height]  # fmt: skip
    return json.dumps([{"bbox_2d": [round(v) for v in grid], "label": "thing"}])


def _new_store(tmp_path, specimens: list[tuple]) -> tuple[str, str]:
    """An empty store with ``specimens`` ((id, width, height, reference box)), and the config
    JSON of a qwen3_vl_json grounding evaluation to commit steps with."""
    root = str(tmp_path / "store")
    config = config_from_dict(
        {"run_dir": str(tmp_path / "run"), "base_model": str(tmp_path / "base"), "store": root,
         "task": "grounding", "data": {"path": str(tmp_path)}, "device": "cpu",
         "output_format": "qwen3_vl_json"}
    )  # fmt: skip
    png = io.BytesIO()
    Image.new("RGB", (8, 6), (90, 120, 150)).save(png, format="PNG")
    store.create_store(root)
    store.write_specimens(
        root,
        [Specimen(sid, "grounding", "thing", w, h, image_bytes=png.getvalue(),
                  ref_boxes=[Box(*ref, label="thing")]) for sid, w, h, ref in specimens],
        "v1",
    )  # fmt: skip
    return root, json.dumps(dump_config(config))


def _commit(root: str, config: str, step: int, rows: list[dict]) -> None:
    eval_row = {"run_id": "r", "step": step, "status": "ok", "task": "grounding",
                "model_family": "qwen3_vl", "output_format": "qwen3_vl_json", "config": config}  # fmt: skip
    store.commit_step(root, eval_row, rows)


@pytest.fixture()
def stored(tmp_path):
    """A store with five grounding steps whose rows hold raw text but no parsed boxes."""
    root, config = _new_store(tmp_path, SPECIMENS)
    for step in STEPS:
        rows = [
            store.prediction_row(Prediction(sid, _raw_text(step, w, h, ref), "ok", []))
            for sid, w, h, ref in SPECIMENS
        ]
        _commit(root, config, step, rows)
    return root


def test_every_step_is_parsed_and_scored_again_in_batches(stored, monkeypatch):
    monkeypatch.setattr(rescore, "COMMIT_STEPS", 2)  # 5 steps: batches of 2, 2 and 1
    before = store.open_store(stored)
    old_ids = {s: before.committed("r")[s]["eval_id"] for s in STEPS}
    versions = before.version

    out = io.StringIO()
    done = rescore.rescore_store(stored, console=Console(file=out, width=100))

    assert done == [("r", s) for s in STEPS]
    said = out.getvalue()  # progress over all steps, and each step once its batch is committed
    assert "rescoring steps" in said and "5/5" in said
    assert [f"rescored run r step {s} (2 specimens)" in said for s in STEPS] == [True] * 5
    reader = store.open_store(stored)
    grew = {name: reader.version[name] - versions[name] for name in versions}
    # one predictions overwrite and one evaluations append per batch, not per step
    assert grew["predictions"] == 3 and grew["evaluations"] == 3
    for step in STEPS:
        marker = reader.committed("r")[step]
        assert json.loads(marker["timings"])["rescore_of"] == old_ids[step]
        rows = {r["specimen_id"]: r for r in reader.step("r", step).to_pylist()}
        # specimen a: 0-1000 grid numbers x (640, 480) / 1000, shifted by 2000 // step
        shift = 2000 // step * 640 / 1000
        box = rows["a"]["pred_boxes"][0]
        assert rows["a"]["parse_status"] == "ok"
        assert (box["x1"], box["y1"], box["x2"], box["y2"]) == pytest.approx(
            (64 + shift, 96, 192 + shift, 192), abs=0.33
        )
        assert rows["a"]["tp"] == 1 and rows["b"]["tp"] == 1
        assert marker["f1"] == 1.0 and marker["eval_id"] != old_ids[step]


def test_a_row_without_its_specimen_names_the_store_run_and_step(stored):
    store.commit_step(
        stored,
        {"run_id": "r", "step": 600, "status": "ok", "task": "grounding",
         "output_format": "qwen3_vl_json",
         "config": store.open_store(stored).committed("r")[100]["config"]},
        [store.prediction_row(Prediction("ghost", "[]", "empty", []))],
    )  # fmt: skip
    with pytest.raises(store.StoreError, match=r"'ghost' \(run r, step 600\).*specimens table"):
        rescore.rescore_store(stored, console=Console(quiet=True))
    # the steps before it in the same batch were not committed half-way: still the originals
    reader = store.open_store(stored)
    assert "rescore_of" not in (reader.committed("r")[500].get("timings") or "")


def test_a_text_repeated_from_the_step_before_is_read_once_and_scored_by_its_own_tokens(
    tmp_path, monkeypatch
):
    """Steps 100 and 200 wrote the same text with other token log-probabilities; step 300 the
    same text cut at max_new_tokens. The parser's reading is reused only where every input it
    reads is the same, and each step's boxes get the scores of its own tokens."""
    root, config = _new_store(tmp_path, [("a", 640, 480, (64, 96, 192, 192))])
    text = '[{"bbox_2d": [100, 200, 300, 400], "label": "thing"}]'
    steps = {100: ([-0.1, -0.2], False), 200: ([-1.0, -2.0], False), 300: ([-1.0, -2.0], True)}
    for step, (logprobs, cut) in steps.items():
        row = store.prediction_row(Prediction("a", text, "ok", [], token_logprobs=logprobs,
                                              token_ends=[26, len(text)], truncated=cut))  # fmt: skip
        _commit(root, config, step, [row])
    reads = []
    real_read = rescore.read_output
    monkeypatch.setattr(rescore, "read_output", lambda *a: reads.append(a[1]) or real_read(*a))

    rescore.rescore_store(root, console=Console(quiet=True))

    assert len(reads) == 2  # step 200 reused step 100's reading; step 300 (cut) read anew
    reader = store.open_store(root)
    got = {s: reader.step("r", s).to_pylist()[0] for s in steps}
    for step in (100, 200):
        box = got[step]["pred_boxes"][0]
        # Qwen3-VL's 0-1000 grid on a 640 x 480 image
        assert (box["x1"], box["y1"], box["x2"], box["y2"]) == pytest.approx((64, 96, 192, 192))
        # both tokens wrote the box: exp(mean log-probability), docs/metrics.md
        assert box["score"] == pytest.approx(math.exp(sum(steps[step][0]) / 2))
        assert got[step]["parse_status"] == "ok"
    assert got[300]["parse_status"] == "truncated"


@pytest.mark.parametrize(
    ("config", "said"),
    [
        (None, r"run r step 600 \(evaluation e600\) has no stored config"),
        ("{not json", r"run r step 600 \(evaluation e600\): its stored config cannot be read"),
        ("UNKNOWN KEY", r"step 600 \(evaluation e600\): its stored config cannot be read.*colour"),
    ],
)
def test_a_step_whose_config_cannot_be_read_is_named(stored, config, said):
    previous = store.open_store(stored).committed("r")[100]["config"]
    if config == "UNKNOWN KEY":  # a key this version does not know (unknown keys are errors)
        config = json.dumps(json.loads(previous) | {"colour": "red"})
    store.commit_step(
        stored,
        {"run_id": "r", "step": 600, "eval_id": "e600", "status": "ok", "task": "grounding",
         "output_format": "qwen3_vl_json", "config": config},
        [store.prediction_row(Prediction("a", "[]", "empty", []))],
    )  # fmt: skip
    with pytest.raises(store.StoreError, match=said):
        rescore.rescore_store(stored, console=Console(quiet=True))
