"""Content hashes of a model's vision part (tower + projector), to know when image
embeddings can be reused: a checkpoint whose vision tensors hash equal to the previous one's
gives the same image embeddings. Hashes cover the tensors as resident (model dtype).
"""

from __future__ import annotations

import hashlib
import re

import torch

from vieval_runner.model.keys import model_keys, vision_modules


def tensor_digest(hasher, name: str, tensor: torch.Tensor) -> None:
    """Feed ``name``, dtype, shape and the raw bytes of ``tensor`` into ``hasher``."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)
    hasher.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
    if t.numel():
        # a uint8 view is zero-copy; hashlib releases the GIL on large buffers
        hasher.update(memoryview(t.view(torch.uint8).numpy()))


def hash_named(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors (order-independent: sorted by name)."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor_digest(hasher, name, tensors[name])
    return hasher.hexdigest()


def resident_vision_hash(loaded) -> str | None:
    """Content hash of the vision part as resident now (adapters included), or None.

    Used when no swap told us the hash (step 0 before any swap, a live training model).
    LoRA tensors are hashed without their adapter name, so equal adapters hash equal.
    """
    if loaded.peft_model is None:  # same names and dtypes as the hash of a swapped-in checkpoint
        names = model_keys(loaded).vision
        if names is None:
            return None
        resident = loaded.model.state_dict()
        return hash_named({name: resident[name] for name in names})
    modules = vision_modules(loaded.model)
    if modules is None:
        return None
    tensors = {}
    for i, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            if loaded.adapter is not None:
                name = re.sub(rf"\.{re.escape(loaded.adapter)}(\.|$)", r"\1", name)
            tensors[f"{i}.{name}"] = tensor
    return hash_named(tensors)


def current_vision_hash(loaded) -> str | None:
    """The resident vision part's hash: from the last swap, else computed from the tensors.

    Computed hashes are kept only for the untouched base; anything else (a live training
    model, LoRA adapters on the tower) is recomputed on every call.
    """
    if loaded.vision_hash is not None:
        return loaded.vision_hash
    digest = resident_vision_hash(loaded)
    if loaded.current == "base" and loaded.peft_model is None and not loaded.base_replaced:
        loaded.vision_hash = loaded.base_vision_hash = digest
    return digest
