"""The session's store-side state: the run's training log, written once and never shortened."""

from __future__ import annotations

import json
import logging
import shutil

from rich.console import Console

from vieval_runner import checkpoints as ckpts
from vieval_runner import store
from vieval_runner.config import config_from_dict
from vieval_runner.pipeline import run as runner
from vieval_runner.testing.fixtures import make_specimens


def _config(tmp_path, run_dir, base, steps):
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    rows = []
    for spec in make_specimens()[:3]:
        (folder / spec.specimen_id).write_bytes(spec.image_bytes)
        box = [1, 1, spec.width - 1, spec.height - 1]
        rows.append({"id": spec.specimen_id, "image": spec.specimen_id, "task": "grounding",
                     "prompt": spec.prompt, "boxes": [{"label": spec.prompt, "box": box}]})  # fmt: skip
    (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return config_from_dict({
        "run_dir": str(run_dir), "base_model": str(base), "store": str(tmp_path / "store"),
        "run_id": "r", "task": "grounding", "data": {"path": str(folder / "val.jsonl")},
        "steps": steps, "batch_size": 4, "max_new_tokens": 4, "device": "cpu",
    })  # fmt: skip


def _stored_steps(config) -> list[int]:
    return sorted({r["step"] for r in store.open_store(config.store).training_log("r").to_pylist()})


def _history_steps(checkpoint) -> list[int]:
    return sorted({e["step"] for e in ckpts.read_trainer_state(checkpoint)["log_history"]})


def test_the_newest_checkpoints_log_is_written_once_and_never_cut_short(
    tmp_path, tiny_run, monkeypatch
):
    run = tiny_run("qwen2_vl")
    writes = []
    real = store.write_training_log
    monkeypatch.setattr(
        store, "write_training_log", lambda *a, **k: writes.append(1) or real(*a, **k)
    )
    config = _config(tmp_path, run.run_dir, run.base_model_dir, [100, 200, 300])
    assert runner.run(config, Console(quiet=True)).evaluated == [100, 200, 300]
    assert len(writes) == 1  # not once per step
    newest = _history_steps(run.run_dir / "checkpoint-300")
    assert _stored_steps(config) == newest and max(newest) == 300

    # evaluating an older checkpoint again leaves the longer stored log as it was
    again = _config(tmp_path, run.run_dir, run.base_model_dir, [100])
    assert runner.run(again, Console(quiet=True)).evaluated == [100]
    assert len(writes) == 1
    assert _stored_steps(again) == newest


def test_evaluating_an_older_step_first_stores_the_whole_runs_log(tmp_path, tiny_run):
    """Steps evaluated in any order: the log is the newest selected checkpoint's."""
    run = tiny_run("qwen2_vl")
    config = _config(tmp_path, run.run_dir, run.base_model_dir, [100, 200])
    assert runner.run(config, Console(quiet=True)).evaluated == [100, 200]
    assert _stored_steps(config) == _history_steps(run.run_dir / "checkpoint-200")
    # a later run that reaches further extends it
    further = _config(tmp_path, run.run_dir, run.base_model_dir, [300])
    runner.run(further, Console(quiet=True))
    assert max(_stored_steps(further)) == 300


def test_a_bad_trainer_state_is_a_warning_and_the_step_stays_committed(tmp_path, tiny_run, caplog):
    run = tiny_run("qwen2_vl")
    run_dir = tmp_path / "run"
    shutil.copytree(run.run_dir / "checkpoint-100", run_dir / "checkpoint-100")
    (run_dir / "checkpoint-100" / "trainer_state.json").write_text("{ not json")
    config = _config(tmp_path, run_dir, run.base_model_dir, [100])
    with caplog.at_level(logging.WARNING, logger="vieval"):
        outcome = runner.run(config, Console(quiet=True))
    assert outcome.evaluated == [100] and not outcome.failed
    assert store.open_store(config.store).steps("r") == [100]
    warning = next(r.getMessage() for r in caplog.records if "training log" in r.getMessage())
    assert "malformed trainer state" in warning and "checkpoint-100" in warning
