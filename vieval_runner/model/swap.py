"""Swapping a full checkpoint's weights into the resident model in place, and back to the base.

The swap maps checkpoint file keys to in-memory parameter names with transformers' own
conversion mapping (what ``from_pretrained`` applies), then enforces strict coverage: a
checkpoint that would load nothing, or part of the model, is an error, never a silent no-op.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vieval_runner.model.keys import model_keys, state_targets
from vieval_runner.model.lora import remove_adapters
from vieval_runner.model.prefetch import read_checkpoint
from vieval_runner.records import CheckpointError, LoadedModel


def _summary(keys: list[str]) -> str:
    head = ", ".join(keys[:5])
    return f"{len(keys)} ({head}{', ...' if len(keys) > 5 else ''})"


def _plan(
    loaded: LoadedModel, ckpt: Path, file_shapes: dict[Path, dict[str, tuple[int, ...]]]
) -> tuple[dict[Path, dict[str, str]], dict[str, torch.Tensor]]:
    """Check a checkpoint against the model; per file, file key -> model name to copy into."""
    model = loaded.model
    targets = state_targets(model)
    rename = model_keys(loaded).rename
    plan: dict[Path, dict[str, str]] = {}
    unexpected, mismatched, covered = [], [], set()
    for path, shapes in file_shapes.items():
        for key, shape in shapes.items():
            name = rename(key)
            if name not in targets:
                unexpected.append(key)
            elif tuple(targets[name].shape) != shape:
                mismatched.append(f"{key}: file {list(shape)} vs model {list(targets[name].shape)}")
            else:
                plan.setdefault(path, {})[key] = name
                covered.add(id(targets[name]))
    # tied weights share one tensor object: covered through any of their names
    missing = [name for name, t in targets.items() if id(t) not in covered]
    problems = []
    if missing:
        problems.append(f"missing {_summary(missing)}")
    if unexpected:
        problems.append(f"unexpected {_summary(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_summary(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{ckpt}: checkpoint does not match the model: " + "; ".join(problems)
        )
    return plan, targets


def swap_weights(loaded: LoadedModel, checkpoint_dir: str | Path, prefetched=None) -> None:
    """Copy a full checkpoint's weights into the resident model in place (strict coverage).

    ``prefetched``: the ``prefetch.CheckpointTensors`` of this checkpoint (read ahead on a
    background thread); without it the files are read now. Everything is checked before any
    tensor is copied, so a bad checkpoint leaves the resident weights untouched. Raises
    ``CheckpointError`` naming the path and the keys.
    """
    ckpt = Path(checkpoint_dir)
    if prefetched is not None and Path(prefetched.path) != ckpt:
        raise ValueError(f"prefetched tensors are of {prefetched.path}, not {ckpt}")
    if loaded.peft_model is not None:  # full weights replace the base: adapters come off first
        remove_adapters(loaded)
    copy_in(loaded, ckpt, prefetched)
    loaded.base_replaced = True
    loaded.current = str(ckpt)


def copy_in(loaded: LoadedModel, ckpt: Path, prefetched=None) -> None:
    tensors = prefetched if prefetched is not None else read_checkpoint(loaded, ckpt, pin=False)
    plan, targets = _plan(loaded, ckpt, tensors.shapes())
    with torch.no_grad():
        for path, keys in plan.items():
            source = tensors.files[path]
            for key, name in keys.items():
                # copy_ casts to the resident dtype/device the way from_pretrained does;
                # from pinned memory the host-to-device copy is asynchronous
                targets[name].copy_(source[key], non_blocking=True)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)  # the pinned buffers may be freed after this
    loaded.vision_hash = tensors.vision_hash


def restore_base(loaded: LoadedModel) -> None:
    """Step 0: take adapters off and put the base weights back (from files or the host copy).

    After LoRA checkpoints only the adapters come off: the base tensors were never touched.
    """
    if loaded.peft_model is not None:
        remove_adapters(loaded)
    if loaded.base_replaced:
        if loaded.base_weights_dir is not None:
            copy_in(loaded, loaded.base_weights_dir)
        else:
            targets = state_targets(loaded.model)
            with torch.no_grad():
                for name, value in (loaded.base_state or {}).items():
                    targets[name].copy_(value)
            loaded.vision_hash = None  # recomputed from the resident tensors when needed
        loaded.base_replaced = False
        loaded.base_vision_hash = loaded.vision_hash
    else:
        loaded.vision_hash = loaded.base_vision_hash
    loaded.current = "base"
