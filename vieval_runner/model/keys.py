"""Which tensors a checkpoint must provide and under which names: the checkpoint's weight files,
the model's parameter names, transformers' file-key renaming, and the vision part's names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vieval_runner.records import CheckpointError, LoadedModel


def vision_modules(model) -> list[torch.nn.Module] | None:
    """The modules an image goes through before the language model (tower, projector).

    Generic over transformers 5 composite models: the inner model's children other than
    its language model. None when no language model submodule is found.
    """
    inner = getattr(model, "model", model)
    language = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)
    if not isinstance(language, torch.nn.Module):
        return None
    found = [m for _, m in inner.named_children() if m is not language]
    return found or None


def weight_files(ckpt: Path, required: bool = True) -> dict[Path, list[str] | None]:
    """Safetensors files of a checkpoint -> keys to take from each (None: all)."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc!r})") from None
        files: dict[Path, list[str] | None] = {}
        for key, name in weight_map.items():
            files.setdefault(ckpt / name, []).append(key)
        absent = [str(p) for p in files if not p.is_file()]
        if absent:
            raise CheckpointError(f"{ckpt}: shards named by the index are missing: {absent[:3]}")
        return files
    single = ckpt / "model.safetensors"
    if single.is_file():
        return {single: None}
    if required:
        found = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else "no such folder"
        raise CheckpointError(
            f"{ckpt}: no model.safetensors or model.safetensors.index.json (found: {found})"
        )
    return {}


def state_targets(model) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint must provide: parameters and persistent buffers by name."""
    return dict(model.state_dict(keep_vars=True))


def key_mapper(model):
    """file key -> in-memory name, the way ``from_pretrained`` renames (transformers >= 5)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = state_targets(model)
    prefix = model.base_model_prefix

    def rename(key: str) -> str:
        new_key, converter_pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if converter_pattern is not None:
            # fusing/splitting converters (MoE experts ...) are not an in-place copy
            raise CheckpointError(f"key {key!r} needs a weight converter; swap unsupported")
        return new_key

    return rename


@dataclass
class ModelKeys:
    """File key -> model name mapping, model dtypes, and the names in the vision part."""

    rename: Any
    dtypes: dict[str, torch.dtype]
    vision: frozenset[str] | None  # None: the model's vision part is not identifiable


def model_keys(loaded: LoadedModel) -> ModelKeys:
    """The key mapping and the vision names of ``loaded``'s model (computed once)."""
    if loaded.keys is None:
        model = loaded.model
        targets = state_targets(model)
        vision = None
        modules = vision_modules(model)
        if modules is not None:
            ids = {id(t) for m in modules for t in m.state_dict(keep_vars=True).values()}
            vision = frozenset(n for n, t in targets.items() if id(t) in ids)
        dtypes = {n: t.dtype for n, t in targets.items()}
        loaded.keys = ModelKeys(key_mapper(model), dtypes, vision)
    return loaded.keys
