"""The trackers' hook: a tracker that fails warns and never loses or blocks a store commit."""

from __future__ import annotations

import socket
import time

import pytest

from vieval_runner import store
from vieval_runner.config import ConfigError, config_from_dict, load_config
from vieval_runner.pipeline import run as runner
from vieval_runner.pipeline.tracking import TrackerWarning
from vieval_runner.testing.fixtures import quiet_console, run_config

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

STEPS = [0, 200]


def test_failing_trackers_warn_and_every_step_is_committed(tmp_path, tiny_run, monkeypatch):
    # TensorBoard: logging_dir inside a regular file, so its folder cannot be made
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    # MLflow: a server on loopback that accepts connections and never answers
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config = run_config(
        tmp_path,
        tiny_run("qwen25_vl"),
        steps=STEPS,
        report_to=["tensorboard", "mlflow"],
        logging_dir=str(blocker / "tb"),
    )
    started = time.perf_counter()
    try:
        with pytest.warns(TrackerWarning) as caught:
            outcome = runner.run(config, quiet_console())
    finally:
        silent.close()
    assert outcome.evaluated == STEPS and outcome.exit_status == 0
    assert store.open_store(config.store).steps(config.effective_run_id) == STEPS
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("tensorboard: not logging this run") for m in messages), messages
    assert any(m.startswith("mlflow: not logging this run") for m in messages), messages
    assert time.perf_counter() - started < 120  # the silent server cost its timeout, no more


def test_report_to_takes_the_trainers_spellings(tmp_path, tiny_run):
    base = {
        "run_dir": str(tmp_path),
        "base_model": str(tmp_path),
        "store": str(tmp_path / "s"),
        "data": {"path": "x"},
    }
    assert config_from_dict(base).report_to == []
    assert config_from_dict({**base, "report_to": "none"}).report_to == []
    assert config_from_dict({**base, "report_to": "wandb"}).report_to == ["wandb"]
    assert config_from_dict({**base, "report_to": "all"}).report_to == [
        "tensorboard",
        "mlflow",
        "wandb",
    ]
    with pytest.raises(ConfigError, match="report_to"):
        config_from_dict({**base, "report_to": ["comet"]})


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    path = tmp_path / "eval.yaml"
    path.write_text(
        "run_dir: r\nbase_model: b\nstore: s\ndata: {path: v.jsonl}\nreport_to: [wandb]\n"
    )
    with pytest.raises(ConfigError, match=r"vieval-runner\[trackers\]"):
        load_config(path)


def test_cli_report_to_sets_the_config(tmp_path):
    from vieval_runner.cli.arguments import build_parser
    from vieval_runner.cli.commands import run_overrides

    path = tmp_path / "eval.yaml"
    path.write_text("run_dir: r\nbase_model: b\nstore: s\ndata: {path: v.jsonl}\n")
    args = build_parser().parse_args(
        ["run", str(path), "batch_size=2", "--report-to", "tensorboard", "wandb"]
    )
    assert load_config(path, run_overrides(args)).report_to == ["tensorboard", "wandb"]
    args = build_parser().parse_args(["watch", str(path), "--report_to", "mlflow"])
    assert load_config(path, run_overrides(args)).report_to == ["mlflow"]
    args = build_parser().parse_args(["run", str(path)])
    assert load_config(path, run_overrides(args)).report_to == []


@pytest.mark.slow
def test_callback_logs_into_the_trainers_own_runs(tmp_path, tiny_run, monkeypatch):
    """In process, the eval curves go into the very W&B run, MLflow run and TensorBoard folder
    the Trainer logs its loss to."""
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing import event_accumulator as ea
    from transformers import Trainer, TrainingArguments

    from vieval_runner.demo import shapes, training
    from vieval_runner.model import loading as models
    from vieval_runner.pipeline.callback import VievalCallback
    from vieval_runner.testing import wandb_offline

    monkeypatch.chdir(tmp_path)  # MLflow's ./mlruns artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trainer")
    # the Trainer's MLflowCallback sets MLFLOW_EXPERIMENT_ID itself: gone again after the test
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.teardown()  # settings an earlier test's wandb.setup kept (its WANDB_DIR) go
    base = tiny_run("paligemma").base_model_dir
    train = shapes.write_split(tmp_path / "data", n=8, task="grounding", seed=1, name="train")
    val = shapes.write_split(tmp_path / "data", n=3, task="grounding", seed=1, name="val")
    config = config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "base_model": str(base),
            "store": str(tmp_path / "store"),
            "data": {"path": str(val)},
            "batch_size": 3,
            "max_new_tokens": 8,
            "device": "cpu",
            "report_to": ["tensorboard", "mlflow", "wandb"],
            "report_sample": 2,
        }
    )
    loaded = models.load_base(base, device="cpu")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_only_model=True,
        report_to=["tensorboard", "mlflow", "wandb"],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    loaded.model.train()
    trainer = Trainer(
        model=loaded.model,
        args=args,
        train_dataset=training.ShapesDataset(training.read_rows(train), tmp_path / "data", loaded),
        data_collator=training.PadCollator(loaded.processor.tokenizer.pad_token_id),
        processing_class=loaded.processor,
        callbacks=[VievalCallback(config)],
    )
    trainer.train()
    wandb.finish()  # the Trainer's run; vieval never finishes it
    saves = [2, 4]

    # MLflow: the Trainer's one run holds its loss and the eval metrics
    client = MlflowClient()
    experiment = client.get_experiment_by_name("trainer")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert client.get_metric_history(run_id, "loss")
    assert [m.step for m in client.get_metric_history(run_id, "vieval/f1")] == saves

    # W&B: the Trainer's one offline run, eval rows on its train/global_step axis
    folders = wandb_offline.run_folders(tmp_path)
    assert len(folders) == 1
    rows = wandb_offline.history(wandb_offline.run_file(folders[0]))
    assert any("train/loss" in r for r in rows)
    assert [r["train/global_step"] for r in rows if "vieval/f1" in r] == saves

    # TensorBoard: the Trainer's own folder (output_dir/runs/<time_host>)
    (folder,) = (tmp_path / "run" / "runs").iterdir()
    events = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("vieval/f1")] == saves
    assert len([t for t in events.Tags()["images"] if t.startswith("vieval/sample/")]) == 2


def test_a_tracker_failing_mid_run_warns_and_goes_off(tmp_path, tiny_run, monkeypatch):
    """MLflow's artifact store fails at step 200 (a folder where the step's table file goes):
    step 0 is in MLflow, both steps are in the store, the run ends normally."""
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "broken")
    config = run_config(tmp_path, tiny_run("qwen25_vl"), steps=STEPS, report_to=["mlflow"])
    client = MlflowClient()
    experiment = client.create_experiment("broken", artifact_location=str(tmp_path / "art"))
    # the run an earlier `vieval run` left (vieval finds it by this tag and logs into it)
    run = client.create_run(experiment, tags={"vieval.run_id": config.effective_run_id})
    artifacts = tmp_path / "art" / run.info.run_id / "artifacts"
    (artifacts / "vieval" / "specimens" / "step_00000200.json").mkdir(parents=True)
    with pytest.warns(TrackerWarning, match="mlflow: logging step 200 failed") as caught:
        outcome = runner.run(config, quiet_console())
    assert outcome.evaluated == STEPS and outcome.exit_status == 0
    assert store.open_store(config.store).steps(config.effective_run_id) == STEPS
    assert "off for the rest of this run" in str(caught[0].message)
    history = client.get_metric_history(run.info.run_id, "vieval/f1")
    assert [m.step for m in history] == [0, 200]  # step 200's metrics went before its table
