"""Was a LoRA adapter trained on the base it is evaluated on?

peft records the training base in ``adapter_config.json`` (``base_model_name_or_path``). An
adapter of another base with the same architecture loads without any error and gives
meaningless outputs, so the recorded base is compared with the evaluated one: the same name
or folder, else, when the recorded base is a folder here too, the same weights (the content
hash ``checkpoints.checkpoint_hash`` computes for every checkpoint). Hand-written: peft and
transformers record the name but never compare it.
"""

from __future__ import annotations

import json
from pathlib import Path

from vieval_runner.checkpoints import checkpoint_hash

ADAPTER_CONFIG = "adapter_config.json"
_HASHES: dict[tuple[str, float], str] = {}  # (folder, newest mtime) -> content hash


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The adapter's recorded ``base_model_name_or_path`` (None when absent or unreadable:
    the adapter load itself reports a bad config)."""
    try:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name.strip() else None


def _hash(folder: Path) -> str:
    newest = max((p.stat().st_mtime for p in folder.glob("*.safetensors")), default=0.0)
    key = (str(folder.resolve()), newest)
    if key not in _HASHES:  # a multi-GB base is read once per process, not once per adapter
        _HASHES[key] = checkpoint_hash(folder)
    return _HASHES[key]


def _name(text: str) -> str:
    """``org/Model-7B`` and ``/models/Model-7B/`` -> ``model-7b``."""
    return Path(text.rstrip("/\\")).name.lower()


def base_mismatch(adapter_dir: str | Path, base_model: str | Path) -> str | None:
    """None when the adapter's recorded base is ``base_model`` (or records none), else what
    differs, in words."""
    recorded = adapter_base(adapter_dir)
    if recorded is None:
        return None
    base = str(base_model)
    if recorded.rstrip("/") == base.rstrip("/"):
        return None
    ours, theirs = Path(base).expanduser(), Path(recorded).expanduser()
    if ours.is_dir() and theirs.is_dir():
        if ours.resolve() == theirs.resolve():
            return None
        try:
            same = _hash(ours) == _hash(theirs)
        except Exception:  # e.g. no safetensors in one of them: fall back to the names
            same = None
        if same is not None:
            if same:
                return None
            return (
                f"LoRA adapter {adapter_dir} was trained on base {recorded} "
                f"(content hash {_hash(theirs)[:12]}), evaluated on {base} "
                f"(content hash {_hash(ours)[:12]}): different weights"
            )
    if _name(recorded) == _name(base):
        return None  # a hub id and a local copy of it, or the same model in two places
    return (
        f"LoRA adapter {adapter_dir} was trained on base {recorded}, evaluated on {base} "
        "(different model names; the recorded base is not here to compare its weights)"
    )
