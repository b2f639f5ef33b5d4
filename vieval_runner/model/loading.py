"""Model families, loading the base model once, and swapping checkpoint weights in place.

The swap maps checkpoint file keys to in-memory parameter names with transformers' own
conversion mapping (what ``from_pretrained`` applies), then enforces strict coverage: a
checkpoint that would load nothing, or part of the model, is an error, never a silent no-op.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vieval_runner.generate.vision_attention import pack_vision_attention
from vieval_runner.model.families import (
    FAMILIES,  # the registry lives there; models.FAMILIES stays importable
)
from vieval_runner.model.vision_hash import vision_modules

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


class CheckpointError(Exception):
    """A checkpoint's weights cannot be swapped in (missing, unexpected or mismatched tensors)."""


@dataclass
class LoadedModel:
    """The resident model and what the later stages need to know about it."""

    model: Any
    processor: Any
    family: str
    device: torch.device
    dtype: torch.dtype
    base_model: str
    base_weights_dir: Path | None = None
    current: str = "base"  # which weights are resident: "base" or a checkpoint path
    adapter: str | None = None  # name of the active peft LoRA adapter, if any
    _base_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _base_replaced: bool = False  # a full checkpoint's tensors overwrote the base's
    _peft: Any = field(default=None, repr=False)  # the PeftModel wrapper while adapters are on
    _requires_grad: Any = field(default=None, repr=False)  # base (param, flag)s peft froze
    _adapter_count: int = 0
    # content hash of the resident vision part, set by every swap; None: unknown (recompute)
    vision_hash: str | None = None
    hash_vision: bool = True  # hash the vision part on swaps (off: no embedding cache to feed)
    _base_vision_hash: str | None = None
    _keys: Any = field(default=None, repr=False)  # ModelKeys, computed once

    @property
    def facts(self) -> dict[str, Any]:
        return FAMILIES[self.family]


def family_for_model_type(model_type: str, source: str = "config.json") -> str:
    """The family whose config ``model_type`` is ``model_type``; clear error if none."""
    for family, facts in FAMILIES.items():
        if model_type in facts["model_types"]:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f["model_types"])
    raise ValueError(
        f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(supported)}"
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
        return path if _weight_files(path, required=False) else None
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(base_model, local_files_only=True))
    except Exception:  # not cached / not a repo id: restore_base falls back to a CPU copy
        return None
    return snap if _weight_files(snap, required=False) else None


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
        loaded._base_state = {
            k: v.detach().to("cpu", copy=True) for k, v in _targets(model).items()
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


# ---------------------------------------------------------------- weight swapping


def _weight_files(ckpt: Path, required: bool = True) -> dict[Path, list[str] | None]:
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


def _targets(model) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint must provide: parameters and persistent buffers by name."""
    return dict(model.state_dict(keep_vars=True))


def _key_mapper(model):
    """file key -> in-memory name, the way ``from_pretrained`` renames (transformers >= 5)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = _targets(model)
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
    if loaded._keys is None:
        model = loaded.model
        targets = _targets(model)
        vision = None
        modules = vision_modules(model)
        if modules is not None:
            ids = {id(t) for m in modules for t in m.state_dict(keep_vars=True).values()}
            vision = frozenset(n for n, t in targets.items() if id(t) in ids)
        dtypes = {n: t.dtype for n, t in targets.items()}
        loaded._keys = ModelKeys(_key_mapper(model), dtypes, vision)
    return loaded._keys


def _summary(keys: list[str]) -> str:
    head = ", ".join(keys[:5])
    return f"{len(keys)} ({head}{', ...' if len(keys) > 5 else ''})"


def _plan(
    loaded: LoadedModel, ckpt: Path, file_shapes: dict[Path, dict[str, tuple[int, ...]]]
) -> tuple[dict[Path, dict[str, str]], dict[str, torch.Tensor]]:
    """Check a checkpoint against the model; per file, file key -> model name to copy into."""
    model = loaded.model
    targets = _targets(model)
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
    if loaded._peft is not None:  # full weights replace the base: adapters come off first
        from vieval_runner.model.lora import remove_adapters

        remove_adapters(loaded)
    _copy_in(loaded, ckpt, prefetched)
    loaded._base_replaced = True
    loaded.current = str(ckpt)


def _copy_in(loaded: LoadedModel, ckpt: Path, prefetched=None) -> None:
    from vieval_runner.model.prefetch import read_checkpoint

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
    if loaded._peft is not None:
        from vieval_runner.model.lora import remove_adapters

        remove_adapters(loaded)
    if loaded._base_replaced:
        if loaded.base_weights_dir is not None:
            _copy_in(loaded, loaded.base_weights_dir)
        else:
            targets = _targets(loaded.model)
            with torch.no_grad():
                for name, value in (loaded._base_state or {}).items():
                    targets[name].copy_(value)
            loaded.vision_hash = None  # recomputed from the resident tensors when needed
        loaded._base_replaced = False
        loaded._base_vision_hash = loaded.vision_hash
    else:
        loaded.vision_hash = loaded._base_vision_hash
    loaded.current = "base"


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
        from vieval_runner.model.lora import swap_adapter

        swap_adapter(loaded, checkpoint.path)
        # an adapter that wraps no vision module leaves the image embeddings of the base
        modules = vision_modules(loaded.model) or []
        touched = any("lora_" in n for m in modules for n, _ in m.named_parameters())
        loaded.vision_hash = None if touched else loaded._base_vision_hash
    else:
        raise CheckpointError(f"{checkpoint.path}: unknown checkpoint kind {checkpoint.kind!r}")
