"""`vieval demo`: the embedded default. Fine-tunes a tiny model offline, evaluates it, shows it.

Writes a synthetic shapes dataset (``OUT/data``: a train split and a held-out ``val`` split),
builds a tiny PaliGemma with the project's fixture factory and saves it untrained as
``OUT/base`` (step 0), fine-tunes it with the real ``transformers.Trainer``
(``OUT/run/checkpoint-<step>/``), writes ``OUT/config.yaml`` and evaluates every step with the
runner into ``OUT/store``. Prints the store path on its last line (with the viewer: the last
line before serving).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from rich.console import Console

from vieval_runner.training import TrainSettings

# PaliGemma learns fastest on the CPU: a box is four single <locNNNN> tokens, a fixed 32 px
# input means no per-image token counts, and its processor masks the prompt in the labels.
DEMO_FAMILY = {"grounding": "paligemma", "vqa": "paligemma"}


def default_settings(task: str, seed: int = 0) -> TrainSettings:
    """The training the README's `vieval demo` runs (the thresholds in the tests hold for it)."""
    if task == "vqa":
        return TrainSettings(max_steps=600, save_steps=100, seed=seed)
    return TrainSettings(max_steps=300, save_steps=50, seed=seed)


N_TRAIN = {"grounding": 1000, "vqa": 1500}  # training scenes
N_VAL = 48  # held-out validation scenes: evaluated by the runner, and the Trainer's eval_loss


def write_demo_config(out: Path, task: str) -> Path:
    """The evaluation config of the demo run (relative paths: the folder can move)."""
    config = {
        "run_dir": "run",
        "base_model": "base",
        "store": "store",
        "run_id": f"demo-{task}",
        "task": task,
        "data": {"path": "data/val.jsonl", "format": "jsonl"},
        "batch_size": 16,
        "max_new_tokens": 24,
        "device": "auto",
    }
    path = out / "config.yaml"
    path.write_text(
        "# vieval demo config: `vieval run config.yaml`\n" + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_demo(
    out: str | Path,
    task: str = "grounding",
    seed: int = 0,
    console: Console | None = None,
    settings: TrainSettings | None = None,
    n_train: int | None = None,
) -> Path:
    """Write the demo's data, base model, fine-tuned run and config under ``out``.

    Returns the config path. A finished run already in ``out`` is reused (not retrained).
    ``settings`` / ``n_train`` shrink the training for tests; the defaults are the README's.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from vieval_runner import shapes, training
    from vieval_runner.models import LoadedModel
    from vieval_runner.tiny_models import build_tiny_model

    hf_logging.disable_progress_bar()
    console = console or Console()
    settings = settings or default_settings(task, seed)
    n_train = n_train or N_TRAIN[task]
    family = DEMO_FAMILY[task]
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    val = shapes.write_split(data, n=N_VAL, task=task, seed=seed, name="val")
    train = shapes.write_split(data, n=n_train, task=task, seed=seed, name="train")
    console.print(f"[bold]demo[/]  {task}: {n_train} training scenes, {N_VAL} held-out in {data}")
    final = out / "run" / f"checkpoint-{settings.max_steps}" / "trainer_state.json"
    if final.is_file():
        console.print(f"[bold]demo[/]  reusing the fine-tuned run in {out / 'run'}")
        return write_demo_config(out, task)

    _seed_everything(seed)
    model, processor = build_tiny_model(family, seed)
    model.save_pretrained(out / "base")  # step 0: the untrained model
    processor.save_pretrained(out / "base")
    console.print(
        f"[bold]train[/] tiny {family} ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters), {settings.max_steps} steps, checkpoint every {settings.save_steps}"
    )
    loaded = LoadedModel(model, processor, family, torch.device("cpu"), torch.float32, str(out))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        training.fine_tune(
            loaded,
            training.read_rows(train),
            training.read_rows(val),
            data,
            out / "run",
            settings,
        )
    finally:  # a process-wide switch: leave it as we found it
        torch.use_deterministic_algorithms(was_deterministic)
    return write_demo_config(out, task)


def main(
    task: str = "grounding",
    out: str = "vieval-demo",
    view: bool = True,
    seed: int = 0,
    port: int = 8765,
    settings: TrainSettings | None = None,
    n_train: int | None = None,
) -> int:
    """Build, fine-tune, evaluate and (optionally) serve the demo; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vieval_runner import report, runner, store
    from vieval_runner.config import load_config
    from vieval_runner.logfile import attach_run_log

    console = Console()
    config_path = build_demo(out, task, seed, console, settings, n_train)
    config = load_config(config_path)
    attach_run_log(config)
    outcome = runner.run(config, console)
    report.print_summary(
        report.summarize(store.open_store(config.store), config.effective_run_id), console
    )
    console.print(f"config: {config_path}  (re-run with `vieval run {config_path}`)")
    if view:
        from vieval_runner.viewer import serve

        server = serve([config.store], port=port)
        console.print(f"viewer: {server.url}  (Ctrl+C to stop)")
        print(config.store, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()
    else:
        print(config.store, flush=True)
    return outcome.exit_status
