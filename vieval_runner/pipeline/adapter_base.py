"""A LoRA adapter evaluated on another base than it was trained on: a stored warning, or
(``lora.require_same_base``) a failed checkpoint."""

from __future__ import annotations

import logging

from rich.console import Console

from vieval_runner import checkpoints as ckpts
from vieval_runner.model.lora_base import base_mismatch
from vieval_runner.records import CheckpointError

log = logging.getLogger("vieval")


def check_adapter_base(session, ckpt: ckpts.Checkpoint, console: Console | None = None) -> None:
    """Compare a LoRA checkpoint's recorded base with ``base_model`` before it is applied.

    A mismatch goes into ``session.warnings[step]`` (stored with the evaluation) or, with
    ``lora.require_same_base``, raises ``CheckpointError`` (the step is recorded as failed).
    """
    if ckpt.kind != "lora":
        return
    config = session.config
    problem = base_mismatch(ckpt.path, config.base_model)
    if problem is None:
        return
    if config.lora.require_same_base:
        raise CheckpointError(f"{problem} (lora.require_same_base is true)")
    session.warnings.setdefault(ckpt.step, []).append(problem)
    log.warning("step %s: %s", ckpt.step, problem)
    if console is not None:
        console.print(f"[yellow]warning[/] step {ckpt.step}: {problem}")
