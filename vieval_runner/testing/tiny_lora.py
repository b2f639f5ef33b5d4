"""Tiny LoRA training runs: a base model plus peft adapter checkpoints in Trainer layout."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from vieval_runner.testing.tiny_models import write_base
from vieval_runner.testing.tiny_run import TinyRun, trainer_state

# attention projections every tiny family has (Qwen2, Gemma, Llama, BART, SigLIP, CLIP)
TARGET_MODULES: tuple[str, ...] = ("q_proj", "v_proj")


def write_tiny_lora_run(
    out_dir: str | Path,
    family: str,
    steps: tuple[int, ...] = (100, 200, 300),
    seed: int = 0,
    rank: int = 4,
    target_modules: tuple[str, ...] = TARGET_MODULES,
):
    """Write ``out_dir/base`` and ``out_dir/run/checkpoint-<step>/`` LoRA adapters per step.

    Each checkpoint holds what peft's ``save_pretrained`` writes when a Trainer trains a
    ``PeftModel`` (``adapter_config.json``, ``adapter_model.safetensors``) plus
    ``trainer_state.json``; no processor files (the Trainer got none). LoRA A and B are
    random and non-zero per step, so every step's outputs differ from the base and each other.
    """
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    steps = tuple(sorted(int(s) for s in steps))
    model, processor, base = write_base(out_dir, family, seed)
    model.name_or_path = str(base)  # recorded as the adapter's base_model_name_or_path
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules),
                        lora_dropout=0.0, base_model_name_or_path=str(base))  # fmt: skip
    with warnings.catch_warnings():  # peft 0.21 calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    run_dir = out_dir / "run"
    for step in steps:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
                    param.copy_(noise * (0.3 * math.sqrt(step / 100)))
        ckpt = run_dir / f"checkpoint-{step}"
        peft_model.save_pretrained(ckpt)
        state = trainer_state(step, steps, seed)
        (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    return TinyRun(base_model_dir=base, run_dir=run_dir, steps=steps, family=family)
