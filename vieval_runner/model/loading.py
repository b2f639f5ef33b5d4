"""Loading the base model and its processor once, and making a checkpoint resident.

``apply_checkpoint`` is the one entry per step: the base (step 0), a full checkpoint swapped
in place (``swap``) or a LoRA adapter swapped on the resident base (``lora``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vieval_runner.families import FAMILIES, OUTPUT_FORMAT_ONLY
from vieval_runner.model.keys import state_targets, vision_modules, weight_files
from vieval_runner.model.lora import swap_adapter
from vieval_runner.model.swap import restore_base, swap_weights
from vieval_runner.model.vision_attention import pack_vision_attention
from vieval_runner.records import CheckpointError, LoadedModel

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def family_for_model_type(model_type: str, source: str = "config.json") -> str:
    """The family whose config ``model_type`` is ``model_type``; clear error if none."""
    for family, facts in FAMILIES.items():
        if model_type in facts["model_types"]:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f["model_types"])
    fmt = OUTPUT_FORMAT_ONLY.get(model_type)
    hint = (
        f" (vieval reads this model's output as output_format={fmt}, e.g. with `vieval parse`, "
        "but cannot load it: its code is not in transformers)"
        if fmt
        else ""
    )
    raise ValueError(
        f"{source}: unsupported model_type {model_type!r}{hint}; supported: {', '.join(supported)}"
    )


def detect_family(model_dir: str | Path) -> str:
    """The family of the model in ``model_dir``, read from its ``config.json``."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no config.json, so the model family is unknown") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    if "model_type" not in config:
        raise ValueError(f"{path}: no 'model_type' key, so the model family is unknown")
    return family_for_model_type(config["model_type"], str(path))


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; anything else as named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 elsewhere; else the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _local_weights_dir(base_model: str) -> Path | None:
    """The local folder holding the base model's safetensors (a path or an offline hub cache)."""
    path = Path(base_model)
    if path.is_dir():
        return path if weight_files(path, required=False) else None
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(base_model, local_files_only=True))
    except Exception:  # not cached / not a repo id: restore_base falls back to a CPU copy
        return None
    return snap if weight_files(snap, required=False) else None


def load_base_processor(base_model: str | Path) -> LoadedModel:
    """The base model's family and processor without its weights (``model`` is None): enough
    to prepare the split while the weights load (``load_base(..., processor_of=...)``)."""
    from transformers import AutoConfig, AutoProcessor

    base = str(base_model)
    if Path(base).is_dir():
        family = detect_family(base)
    else:
        family = family_for_model_type(AutoConfig.from_pretrained(base).model_type, base)
    processor = AutoProcessor.from_pretrained(base)
    _set_padding_side(processor, family)
    cpu = torch.device("cpu")
    return LoadedModel(None, processor, family, cpu, torch.float32, base, _local_weights_dir(base))


def load_base(
    base_model: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    processor_of: LoadedModel | None = None,
) -> LoadedModel:
    """Load the base model and its processor once, in eval mode, on ``device`` with SDPA.

    ``processor_of``: a ``load_base_processor`` result whose family and processor to use."""
    import transformers

    base = str(base_model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    head = processor_of or load_base_processor(base)
    family = head.family
    cls = getattr(transformers, FAMILIES[family]["model_class"])
    # straight onto a GPU, not through a host copy of the whole model
    kwargs = {"dtype": torch_dtype, **({"device_map": str(dev)} if dev.type == "cuda" else {})}
    try:
        model = cls.from_pretrained(base, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):  # a family without SDPA support: use its default
        model = cls.from_pretrained(base, **kwargs)
    model.to(dev).eval()
    pack_vision_attention(model)  # Qwen-VL towers: one SDPA call per image size, not per image
    weights_dir = head.base_weights_dir
    loaded = LoadedModel(model, head.processor, family, dev, torch_dtype, base, weights_dir)
    if weights_dir is None:  # no files to re-read: keep a host copy for restore_base
        loaded.base_state = {
            k: v.detach().to("cpu", copy=True) for k, v in state_targets(model).items()
        }
    return loaded


def _set_padding_side(processor, family: str) -> None:
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = FAMILIES[family]["padding_side"]


def load_processor_for(checkpoint_dir: str | Path, base_model: str | Path) -> tuple[Any, bool]:
    """``(processor, from_checkpoint)``: the checkpoint's processor if it ships one, else the base's.

    Trainer checkpoints carry processor files only if a processor was given to the Trainer,
    so ``from_checkpoint`` False is normal (the runner prints a one-time notice).
    """
    from transformers import AutoProcessor

    ckpt = Path(checkpoint_dir)
    has_own = any((ckpt / name).is_file() for name in _PROCESSOR_FILES)
    source = ckpt if has_own else base_model
    processor = AutoProcessor.from_pretrained(str(source))
    family = detect_family(ckpt) if (ckpt / "config.json").is_file() else None
    if family is not None:
        _set_padding_side(processor, family)
    return processor, has_own


def apply_checkpoint(loaded: LoadedModel, checkpoint, prefetched=None) -> None:
    """Make ``checkpoint`` (a ``checkpoints.Checkpoint``) resident, by its ``kind``.

    ``base``: step 0 (adapters off, base weights back); ``full``: in-place weight swap
    (from ``prefetched`` tensors when given); ``lora``: peft adapter swap on the resident
    base. Raises ``CheckpointError``.
    """
    if checkpoint.kind == "base":
        restore_base(loaded)
    elif checkpoint.kind == "full":
        swap_weights(loaded, checkpoint.path, prefetched)
    elif checkpoint.kind == "lora":
        if loaded.base_replaced:  # a full checkpoint is resident: adapters apply to the base
            restore_base(loaded)
        swap_adapter(loaded, checkpoint.path)
        # an adapter that wraps no vision module leaves the image embeddings of the base
        modules = vision_modules(loaded.model) or []
        touched = any("lora_" in n for m in modules for n, _ in m.named_parameters())
        loaded.vision_hash = None if touched else loaded.base_vision_hash
    else:
        raise CheckpointError(f"{checkpoint.path}: unknown checkpoint kind {checkpoint.kind!r}")
