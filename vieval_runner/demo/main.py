"""`vieval demo`: the embedded default. Fine-tunes a tiny model offline, evaluates it, shows it.

Writes a synthetic shapes dataset (``OUT/data``: a train split and a held-out ``val`` split),
builds a tiny PaliGemma with the project's fixture factory and saves it untrained as
``OUT/base`` (step 0), fine-tunes it with the real ``transformers.Trainer``
(``OUT/run/checkpoint-<step>/``), writes ``OUT/config.yaml`` and evaluates every step with the
runner into ``OUT/store``. Prints the store path on its last line (with the viewer: the last
line before serving).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import yaml
from rich.console import Console

from vieval_runner.demo.training import TrainSettings

# PaliGemma learns fastest on the CPU: a box is four single <locNNNN> tokens, a fixed 32 px
# input means no per-image token counts, and its processor masks the prompt in the labels.
DEMO_FAMILY = {"grounding": "paligemma", "vqa": "paligemma"}


def default_settings(task: str) -> TrainSettings:
    """The training the README's `vieval demo` runs (the thresholds in the tests hold for it)."""
    if task == "vqa":
        return TrainSettings(max_steps=1200, save_steps=150)
    return TrainSettings(max_steps=1600, save_steps=200)


N_TRAIN = {"grounding": 2000, "vqa": 2000}  # training scenes
RECIPE = "demo.json"  # what the folder's demo was built with (task, seed, training settings)
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
    if task == "grounding":
        config["box_scores"] = True  # each box scored by its tokens: AP50 and AP@[.5:.95]
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


def _check_reusable(out: Path, recipe: dict) -> None:
    """Refuse an ``--out`` folder that holds another demo (task, seed, settings) or other files.

    Reusing it would evaluate one task's checkpoints on the other task's data.
    """
    from vieval_runner.config import ConfigError

    marker = out / RECIPE
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except json.JSONDecodeError:
            found = None
        if found != recipe:
            raise ConfigError(
                f"{out} holds a demo built with {found}, not {recipe}: "
                "choose another --out or delete that folder"
            )
    elif (out / "run").exists() or (out / "store").exists():
        raise ConfigError(
            f"{out} has run/ or store/ but no {RECIPE}: not a `vieval demo` folder; "
            "choose another --out"
        )


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

    from vieval_runner.demo import shapes, training
    from vieval_runner.records import LoadedModel
    from vieval_runner.testing.tiny_models import build_tiny_model

    hf_logging.disable_progress_bar()
    console = console or Console()
    # the demo's seed drives everything, test-sized settings included
    settings = replace(settings or default_settings(task), seed=seed)
    n_train = n_train or N_TRAIN[task]
    family = DEMO_FAMILY[task]
    out = Path(out).resolve()
    recipe = {"task": task, "family": family, "seed": seed, "n_train": n_train, "n_val": N_VAL,
              "settings": asdict(settings)}  # fmt: skip
    _check_reusable(out, recipe)
    final = out / "run" / f"checkpoint-{settings.max_steps}" / "trainer_state.json"
    if final.is_file():
        console.print(f"[bold]demo[/]  reusing the fine-tuned run in {out / 'run'}")
        return write_demo_config(out, task)
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
    data = out / "data"
    val = shapes.write_split(data, n=N_VAL, task=task, seed=seed, name="val")
    train = shapes.write_split(data, n=n_train, task=task, seed=seed, name="train")
    console.print(f"[bold]demo[/]  {task}: {n_train} training scenes, {N_VAL} held-out in {data}")

    _seed_everything(seed)
    model, processor = build_tiny_model(family, seed)
    model.save_pretrained(out / "base")  # step 0: the untrained model
    processor.save_pretrained(out / "base")
    console.print(
        f"[bold]train[/] tiny {family} ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters), {settings.max_steps} steps, checkpoint every {settings.save_steps}"
    )
    loaded = LoadedModel(model, processor, family, torch.device("cpu"), torch.float32, str(out))
    with _deterministic_cpu():
        training.fine_tune(
            loaded,
            training.read_rows(train),
            training.read_rows(val),
            data,
            out / "run",
            settings,
        )
    return write_demo_config(out, task)


@contextmanager
def _deterministic_cpu() -> Iterator[None]:
    """Deterministic kernels and one thread while training, restored after (process-wide).

    One thread: a tiny model gains nothing from more (on a shared 2-core box it loses 10x to
    oversubscription), and float sums then do not depend on the machine's core count.
    """
    import torch

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


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
    from vieval_runner import report, store
    from vieval_runner.config import load_config
    from vieval_runner.pipeline import run as runner
    from vieval_runner.pipeline.logfile import attach_run_log

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
        server.serve_until_interrupted()
    else:
        print(config.store, flush=True)
    return outcome.exit_status
