"""LoRA checkpoints: swap peft adapters on the resident base model, and take them off again.

A Trainer training a ``PeftModel`` saves ``adapter_config.json`` + ``adapter_model.safetensors``
per checkpoint. The base stays resident; each checkpoint's adapter is loaded next to the
current one, activated, and the old one deleted (peft's ``load_adapter`` + ``set_adapter``),
so any rank or target set works. Step 0 unloads every adapter: the base modules come back
untouched, so the base's outputs are exact. Wrapping freezes the base parameters
(``requires_grad=False``) and ``unload()`` leaves them frozen, while torch's ``matmul`` takes
another kernel for a non-contiguous 3-D input when the weight is frozen (Florence-2's channel
attention: up to 4e-6 in the logits), so unloading restores each parameter's flag. peft is
used directly: transformers' own ``load_adapter`` needs peft >= 0.22.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from vieval_runner.records import CheckpointError, LoadedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _adapter_config(ckpt: Path):
    """The checkpoint's peft config; a clear ``CheckpointError`` when absent or unreadable."""
    from peft import PeftConfig

    path = ckpt / ADAPTER_CONFIG
    if not path.is_file() or not (ckpt / ADAPTER_WEIGHTS).is_file():
        found = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else "no such folder"
        raise CheckpointError(
            f"{ckpt}: not a LoRA checkpoint: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            f"(found: {found})"
        )
    try:
        config = PeftConfig.from_pretrained(str(ckpt))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable adapter config ({exc})") from None
    if config.peft_type.value != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.peft_type.value}; only LORA is supported")
    return config


def _check_loaded(ckpt: Path, name: str, result) -> None:
    """Strict coverage: every adapter tensor in the file lands in a LoRA layer, and vice versa."""
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if f".{name}." in k]
    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensors match no layer of the model ({unexpected[0]}, ...)"
        )
    if missing:
        problems.append(f"{len(missing)} LoRA tensors missing from the file ({missing[0]}, ...)")
    if problems:
        raise CheckpointError(
            f"{ckpt}: adapter does not fit the base model: " + "; ".join(problems)
        )


def swap_adapter(loaded: LoadedModel, checkpoint_dir: str | Path) -> None:
    """Make ``checkpoint_dir``'s LoRA adapter the active one on the resident base model.

    A bad adapter (other base, wrong target modules or shapes, tensors that fit nothing)
    raises ``CheckpointError`` naming the checkpoint and leaves the previous state active.
    """
    from peft import PeftModel

    ckpt = Path(checkpoint_dir)
    config = _adapter_config(ckpt)
    if loaded.base_replaced:
        raise CheckpointError(f"{ckpt}: a full checkpoint is resident; restore the base first")
    loaded.adapter_count += 1
    name = f"adapter_{loaded.adapter_count}"
    previous = loaded.adapter
    created = loaded.peft_model is None
    try:
        if created:
            loaded.base_requires_grad = [(p, p.requires_grad) for p in loaded.model.parameters()]
            with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecates
                warnings.simplefilter("ignore", FutureWarning)
                loaded.peft_model = PeftModel(loaded.model, config, adapter_name=name)
        result = loaded.peft_model.load_adapter(
            str(ckpt), adapter_name=name, torch_device=str(loaded.device)
        )
        _check_loaded(ckpt, name, result)
        loaded.peft_model.set_adapter(name)
    except Exception as exc:
        _rollback(loaded, name, previous)
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(
            f"{ckpt}: LoRA adapter does not fit the base model ({type(exc).__name__}: {exc})"
        ) from exc
    if previous is not None:
        loaded.peft_model.delete_adapter(previous)
    loaded.adapter = name
    loaded.current = str(ckpt)


def _rollback(loaded: LoadedModel, name: str, previous: str | None) -> None:
    """Undo a failed load: drop the new adapter, re-activate the previous one (or none)."""
    peft = loaded.peft_model
    if peft is None:
        return
    if previous is None:
        remove_adapters(loaded)
        return
    if name in peft.peft_config:
        peft.delete_adapter(name)
    peft.set_adapter(previous)


def remove_adapters(loaded: LoadedModel) -> None:
    """Unload every adapter: the base model's own modules and weights are back, unchanged."""
    if loaded.peft_model is None:
        return
    # unload() puts each wrapped layer's untouched base layer back in place (no merge)
    loaded.model = loaded.peft_model.unload()
    loaded.model.eval()
    for param, requires_grad in loaded.base_requires_grad or []:  # peft froze them; torch's
        param.requires_grad_(requires_grad)  # matmul path depends on the flag, so restore it
    loaded.base_requires_grad = None
    loaded.peft_model = None
    loaded.adapter = None
