"""Reading checkpoint tensors ahead of time, and content hashes of the vision part.

``read_checkpoint`` loads every tensor of a full checkpoint into host memory (pinned when the
model lives on CUDA, so the in-place copy is an async DMA), keyed by file key, and hashes the
tensors that land in the vision part of the model (as they will be resident: cast to the
model's dtype). ``prefetch_checkpoint`` does the same on a background thread, so the next
checkpoint's disk read overlaps the current one's generation; ``swap.swap_weights`` then
copies from the prefetched tensors with the same key mapping and strict coverage check.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vieval_runner.model.keys import model_keys, weight_files
from vieval_runner.model.vision_hash import hash_named
from vieval_runner.records import CheckpointError

# one reader thread for the whole process: prefetches are sequential by design
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vieval-prefetch")


@dataclass
class CheckpointTensors:
    """A full checkpoint's tensors in host memory, per file, keyed by the file's own keys."""

    path: Path
    files: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict)
    vision_hash: str | None = None  # hash of the vision part as it will be resident
    read_s: float = 0.0

    def shapes(self) -> dict[Path, dict[str, tuple[int, ...]]]:
        return {p: {k: tuple(t.shape) for k, t in ts.items()} for p, ts in self.files.items()}


def read_checkpoint(
    loaded, checkpoint_dir: str | Path, pin: bool | None = None
) -> CheckpointTensors:
    """Every tensor of a full checkpoint in host memory, plus the vision-part hash.

    Raises ``CheckpointError`` for missing or unreadable files (naming the path).
    The coverage check against the model happens at swap time (``swap.swap_weights``).
    """
    import time

    from safetensors import safe_open

    t0 = time.perf_counter()
    ckpt = Path(checkpoint_dir)
    if pin is None:
        pin = loaded.device.type == "cuda" and torch.cuda.is_available()
    keys = model_keys(loaded)
    hash_vision = keys.vision is not None and loaded.hash_vision
    out = CheckpointTensors(ckpt)
    vision: dict[str, torch.Tensor] = {}
    for path, wanted in weight_files(ckpt).items():
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys()) if wanted is None else wanted
                tensors = {}
                for key in names:
                    tensor = f.get_tensor(key)
                    if pin:  # page-locked host memory: the H2D copy at swap time is a DMA
                        tensor = tensor.pin_memory()
                    tensors[key] = tensor
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
        out.files[path] = tensors
        if hash_vision:
            for key, tensor in tensors.items():
                name = keys.rename(key)
                if name in keys.vision:
                    dtype = keys.dtypes.get(name, tensor.dtype)
                    vision[name] = tensor if tensor.dtype == dtype else tensor.to(dtype)
    if hash_vision:
        out.vision_hash = hash_named(vision)
    out.read_s = time.perf_counter() - t0
    return out


def prefetch_checkpoint(
    loaded, checkpoint_dir: str | Path, pin: bool | None = None
) -> Future[CheckpointTensors]:
    """Start reading a full checkpoint on the background thread; ``.result()`` gives it.

    ``pin``: as ``read_checkpoint`` (None: pinned on CUDA). Errors (missing or corrupt files)
    surface from ``.result()`` as ``CheckpointError``.
    """
    model_keys(loaded)  # computed here, on the caller's thread, before the model changes
    return _EXECUTOR.submit(read_checkpoint, loaded, Path(checkpoint_dir), pin)
