"""A tiny training run as files: the run record and a ``trainer_state.json`` as the Hugging
Face Trainer writes it (test fixtures)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TinyRun:
    """A written tiny training run: base model dir, Trainer-layout run dir and its steps."""

    base_model_dir: Path
    run_dir: Path
    steps: tuple[int, ...]
    family: str


def trainer_state(step: int, steps: tuple[int, ...], seed: int) -> dict:
    """A Trainer ``trainer_state.json`` as transformers writes it (loss every 10 steps)."""
    gen = torch.Generator().manual_seed(seed + step)
    history: list[dict] = []
    for s in range(10, step + 1, 10):
        loss = 2.5 * math.exp(-s / 400) + 0.05 * float(torch.rand(1, generator=gen))
        history.append({"epoch": round(s / 200, 4), "grad_norm": round(1.5 * math.exp(-s / 500), 4),
                        "learning_rate": 2e-5 * (1 - s / (max(steps) + 1)),
                        "loss": round(loss, 4), "step": s})  # fmt: skip
        if s in steps:
            history.append({"epoch": round(s / 200, 4), "eval_loss": round(loss * 1.1, 4),
                            "eval_runtime": 1.23, "eval_samples_per_second": 52.0,
                            "eval_steps_per_second": 6.5, "step": s})  # fmt: skip
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": round(step / 200, 4),
        "eval_steps": steps[0],
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": history,
        "logging_steps": 10,
        "max_steps": max(steps),
        "num_input_tokens_seen": 0,
        "num_train_epochs": math.ceil(max(steps) / 200),
        "save_steps": steps[0],
        "stateful_callbacks": {"TrainerControl": {"args": {
            "should_epoch_stop": False, "should_evaluate": False, "should_log": False,
            "should_save": True, "should_training_stop": step == max(steps)}, "attributes": {}}},
        "total_flos": 0.0,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }  # fmt: skip
