"""During training: `vieval watch` in one process while a real Trainer saves checkpoints in
another, and `VievalCallback` evaluating the live model on every save."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Trainer, TrainerCallback, TrainingArguments

from vieval_runner import store
from vieval_runner.config import config_from_dict
from vieval_runner.demo import shapes, training
from vieval_runner.model import loading as models
from vieval_runner.pipeline.callback import VievalCallback

REPO = Path(__file__).resolve().parents[2]


def _split(folder: Path, n_train: int = 16, n_val: int = 6) -> tuple[Path, Path]:
    train = shapes.write_split(folder, n=n_train, task="grounding", seed=1, name="train")
    val = shapes.write_split(folder, n=n_val, task="grounding", seed=1, name="val")
    return train, val


def _trainer(base_dir: Path, data: Path, train_jsonl: Path, out: Path, callbacks=()) -> Trainer:
    """A real Trainer on the tiny PaliGemma: 6 steps, a checkpoint every 2."""
    loaded = models.load_base(base_dir, device="cpu")
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        save_steps=2,
        save_strategy="steps",
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_only_model=True,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    loaded.model.train()
    return Trainer(
        model=loaded.model,
        args=args,
        train_dataset=training.ShapesDataset(training.read_rows(train_jsonl), data, loaded),
        data_collator=training.PadCollator(loaded.processor.tokenizer.pad_token_id),
        processing_class=loaded.processor,
        callbacks=list(callbacks),
    )


def _evaluations_by_step(root: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for e in store.open_store(str(root)).evaluations().to_pylist():
        if e["status"] == "ok":
            counts[e["step"]] = counts.get(e["step"], 0) + 1
    return counts


@pytest.mark.slow
def test_watch_evaluates_each_checkpoint_once_while_a_trainer_runs(tmp_path, tiny_run):
    base = tiny_run("paligemma").base_model_dir
    train, val = _split(tmp_path / "data")
    config = {
        "run_dir": str(tmp_path / "run"),  # does not exist yet: cold start
        "base_model": str(base),
        "store": str(tmp_path / "store"),
        "data": {"path": str(val)},
        "batch_size": 6,
        "max_new_tokens": 12,
        "device": "cpu",
        "watch": {"poll_seconds": 0.5, "settle_seconds": 5, "idle_timeout": 240},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    watcher = subprocess.Popen(
        [sys.executable, "-m", "vieval_runner", "watch", str(config_path)],
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    waiting = threading.Event()

    def read() -> None:
        for line in watcher.stdout:
            lines.append(line)
            if "waiting for the first checkpoint" in line:
                waiting.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert waiting.wait(180), "".join(lines)
        _trainer(base, tmp_path / "data", train, tmp_path / "run").train()
        assert watcher.wait(timeout=240) == 0, "".join(lines)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    reader.join(5)
    output = "".join(lines)
    assert "training finished" in output
    assert _evaluations_by_step(tmp_path / "store") == {0: 1, 2: 1, 4: 1, 6: 1}
    log = store.open_store(str(tmp_path / "store")).training_log("run").to_pylist()
    assert [r["step"] for r in log if r.get("loss") is not None][:3] == [1, 2, 3]


def test_callback_evaluates_the_live_model_on_every_save(tmp_path, tiny_run):
    base = tiny_run("paligemma").base_model_dir
    train, val = _split(tmp_path / "data")
    config = config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "base_model": str(base),
            "store": str(tmp_path / "store"),
            "data": {"path": str(val)},
            "batch_size": 3,
            "max_new_tokens": 12,
            "device": "cpu",
        }
    )
    modes: list[bool] = []

    class RecordMode(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            modes.append(model.training)

    callback = VievalCallback(config)
    trainer = _trainer(base, tmp_path / "data", train, tmp_path / "run", [callback, RecordMode()])
    trainer.train()
    assert callback.evaluated == [2, 4, 6]
    assert modes and all(modes)  # back in train mode after every evaluation
    assert _evaluations_by_step(tmp_path / "store") == {2: 1, 4: 1, 6: 1}

    # the live evaluation equals evaluating the saved checkpoint with `vieval run`
    from vieval_runner.pipeline import run as runner

    reader = store.open_store(str(tmp_path / "store"))
    live = {r["specimen_id"]: r["raw_text"] for r in reader.step("run", 6).to_pylist()}
    rerun = config.model_copy(update={"steps": [6], "store": str(tmp_path / "store2")})
    runner.run(rerun, console=None)
    saved = store.open_store(str(tmp_path / "store2")).step("run", 6).to_pylist()
    assert {r["specimen_id"]: r["raw_text"] for r in saved} == live
    assert torch.is_grad_enabled()


@pytest.mark.slow
def test_callback_subprocess_mode_launches_vieval_run_per_save(tmp_path, tiny_run):
    base = tiny_run("paligemma").base_model_dir
    train, val = _split(tmp_path / "data", n_val=3)
    config_path = tmp_path / "eval.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "base_model": str(base),
                "store": str(tmp_path / "store"),
                "data": {"path": str(val)},
                "batch_size": 3,
                "max_new_tokens": 8,
            }
        )
    )
    callback = VievalCallback(config_path, mode="subprocess", device="cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _trainer(base, tmp_path / "data", train, tmp_path / "run", [callback]).train()
    assert callback.evaluated == [2, 4, 6]  # on_train_end waited for the last one
    assert _evaluations_by_step(tmp_path / "store") == {2: 1, 4: 1, 6: 1}
    evaluations = store.open_store(str(tmp_path / "store")).evaluations().to_pylist()
    assert {e["device"] for e in evaluations} == {"cpu"}
