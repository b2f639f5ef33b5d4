"""Setup checks before anything is written: a config that cannot run fails here, not per step.

A wrong ``base_model``, a ``device`` this machine lacks or a ``store`` that is a file would
otherwise surface as a failed evaluation per checkpoint (or a traceback) after the store and
its log folder were created. ``validate_setup`` raises ``ConfigError`` naming the setting and
what is wrong; it reads only the file system and the device list.
"""

from __future__ import annotations

import os
from pathlib import Path

from vieval_runner import checkpoints as ckpts
from vieval_runner.config import Config, ConfigError
from vieval_runner.records import CheckpointError


def validate_setup(config: Config, *, watch: bool = False) -> list[str]:
    """Raise ``ConfigError`` (``CheckpointError`` for the run folder and the step selection)
    for a setting that cannot work; return notes worth saying and logging once a log is
    attached (checkpoint-like folders that are not taken, and why).

    ``watch``: the run folder and its checkpoints may not exist yet.
    """
    check_store(config.store)
    check_base_model(config.base_model)
    check_device(config.device)
    if watch and not Path(config.run_dir).is_dir():
        return []
    notes = [
        f"{config.run_dir}: folder {name} not taken: {why}"
        for name, why in ckpts.untaken_folders(config.run_dir)
    ]
    if not watch:
        check_selection(config)
    return notes


def check_store(store: str) -> None:
    """A local store must be a folder, or creatable as one."""
    if "://" in store:
        return  # object stores: deltalake reports its own errors
    path = Path(store)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"store: {store} is a file, not a store folder")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"store: cannot create {store}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"store: cannot write to {ancestor} (no permission)")


def _looks_like_path(name: str) -> bool:
    return (
        Path(name).is_absolute()
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
    )


def check_base_model(base_model: str) -> None:
    """``base_model``: a local model folder, or a hub id that is cached or can be downloaded."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"base_model: {base_model} has no config.json (not a Hugging Face model folder)"
            )
        return
    if path.exists():
        raise ConfigError(f"base_model: {base_model} is a file; give the model's folder")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if _looks_like_path(base_model):
            raise HFValidationError("a path")
        validate_repo_id(base_model)
    except HFValidationError:
        raise ConfigError(f"base_model: no such folder: {base_model}") from None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if isinstance(try_to_load_from_cache(base_model, "config.json"), str):
        return  # in the local hub cache
    if HF_HUB_OFFLINE:
        raise ConfigError(
            f"base_model: {base_model} is not a local folder, and as a hub id it is not in the "
            "local cache while downloads are off (HF_HUB_OFFLINE=1)"
        )


def check_device(device: str) -> None:
    """``device``: one this machine has (``auto`` always works)."""
    if device in ("auto", "cpu"):
        return
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device: mps is not available on this machine")
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device: {device}, but this machine has no CUDA device (use cpu or auto)"
        )
    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count))
        raise ConfigError(f"device: {device} does not exist; this machine has {have}")


def check_selection(config: Config) -> None:
    """The run folder exists and the selection (steps / every / step_range) picks something."""
    from vieval_runner.pipeline.step import select_checkpoints

    if not select_checkpoints(config):
        raise CheckpointError(empty_selection(config))


def empty_selection(config: Config) -> str:
    """Why the selection picked no checkpoint, naming the settings and the available steps."""
    available = ckpts.available_steps(config.run_dir)
    if not available:
        return (
            f"run_dir: {config.run_dir} holds no checkpoint folders (checkpoint-<step>, "
            "step_<n>, step-<n>, global_step<n>) and include_base is false"
        )
    what = []
    if config.every is not None:
        what.append(f"every={config.every}")
    if config.step_range is not None:
        what.append(f"step_range={list(config.step_range)}")
    base = "" if config.include_base else " (include_base is false)"
    return (
        f"run_dir: no checkpoint of {config.run_dir} matches {', '.join(what) or 'the selection'}"
        f"{base}; available steps: {available}"
    )
