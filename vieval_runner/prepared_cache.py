"""Prepared specimens under a RAM budget: the first ones in memory, the rest on disk.

A Qwen2-VL image at 448 px is ~2.4 MB of pixel values, so a 10,000-specimen split would be
24 GB in RAM. ``PreparedSet`` keeps specimens in memory until their tensors reach
``ram_budget_bytes``, then writes the rest in chunks of safetensors files (one file per
chunk, keys ``<index>.<tensor>``) and reads a specimen back per batch through safetensors'
memory map. Prompt lengths, ids and input sizes stay in memory (generation sorts by them).
The folder is temporary: removed by ``close()`` or when the set is garbage-collected.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, overload

import torch

if TYPE_CHECKING:
    from .preparation import PreparedSpecimen


@dataclass(frozen=True)
class _Meta:
    specimen_id: str
    prompt_len: int
    input_size: tuple[int, int] | None
    keys: tuple[str, ...]  # the specimen's tensor names besides input_ids
    chunk: int  # -1: in memory


def nbytes(prepared: PreparedSpecimen) -> int:
    """Host bytes of one prepared specimen's tensors."""
    tensors = [prepared.input_ids, *prepared.tensors.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class PreparedSet(Sequence):
    """A read-only sequence of ``PreparedSpecimen``, memory-bounded (see the module doc)."""

    def __init__(
        self,
        ram_budget_bytes: int,
        cache_dir: str | Path | None = None,
        chunk_bytes: int = 64 * 2**20,
    ) -> None:
        self.ram_budget_bytes = int(ram_budget_bytes)
        self.ram_bytes = 0  # tensors held in memory (kept specimens + the pending chunk)
        self.disk_bytes = 0
        self._cache_dir = cache_dir
        self._chunk_bytes = chunk_bytes
        self._meta: list[_Meta] = []
        self._memory: dict[int, PreparedSpecimen] = {}
        self._pending: dict[int, PreparedSpecimen] = {}
        self._pending_bytes = 0
        self._spilling = False  # once one specimen went to disk, every later one does
        self._chunks: list[Path] = []
        self.folder: Path | None = None
        self._finalizer = None
        self.peak_ram_bytes = 0

    # -- building ---------------------------------------------------------------------------
    def append(self, prepared: PreparedSpecimen) -> None:
        """Add the next specimen: in memory while under budget, else to the current chunk."""
        size = nbytes(prepared)
        index = len(self._meta)
        keys = tuple(prepared.tensors)
        if not self._spilling and self.ram_bytes + size <= self.ram_budget_bytes:
            self._memory[index] = prepared
            self.ram_bytes += size
            chunk = -1
        else:
            self._spilling = True
            if self._pending_bytes + size > self._chunk_bytes:
                self._flush()  # pending bytes stay under max(chunk_bytes, one specimen)
            self._pending[index] = prepared
            self._pending_bytes += size
            chunk = len(self._chunks)
        self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes + self._pending_bytes)
        self._meta.append(
            _Meta(prepared.specimen_id, prepared.prompt_len, prepared.input_size, keys, chunk)
        )
        if self._pending_bytes >= self._chunk_bytes:
            self._flush()

    def finish(self) -> PreparedSet:
        """Write the last partial chunk; the set is complete after this."""
        self._flush()
        return self

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        if self.folder is None:
            root = Path(self._cache_dir) if self._cache_dir else Path(tempfile.gettempdir())
            root.mkdir(parents=True, exist_ok=True)
            self.folder = root / f"vieval-prepared-{uuid.uuid4().hex[:12]}"
            self.folder.mkdir()
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        tensors = {}
        for index, p in self._pending.items():
            tensors[f"{index}.input_ids"] = p.input_ids.contiguous()
            for key, value in p.tensors.items():
                tensors[f"{index}.{key}"] = value.contiguous()
        path = self.folder / f"chunk-{len(self._chunks):05d}.safetensors"
        save_file(tensors, str(path))
        self._chunks.append(path)
        self.disk_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Remove the on-disk chunks (also done when the set is garbage-collected)."""
        if self._finalizer is not None:
            self._finalizer()

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._meta)

    @property
    def prompt_lens(self) -> list[int]:
        return [m.prompt_len for m in self._meta]

    @property
    def specimen_ids(self) -> list[str]:
        return [m.specimen_id for m in self._meta]

    @property
    def on_disk(self) -> int:
        """How many specimens live on disk."""
        return sum(1 for m in self._meta if m.chunk >= 0)

    @overload
    def __getitem__(self, index: int) -> PreparedSpecimen: ...
    @overload
    def __getitem__(self, index: slice) -> list[PreparedSpecimen]: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index in self._memory:
            return self._memory[index]
        if index in self._pending:
            return self._pending[index]
        return self._load(index)

    def _load(self, index: int) -> PreparedSpecimen:
        from safetensors import safe_open

        from .preparation import PreparedSpecimen

        meta = self._meta[index]
        with safe_open(str(self._chunks[meta.chunk]), framework="pt") as f:
            input_ids = f.get_tensor(f"{index}.input_ids")
            tensors: dict[str, torch.Tensor] = {k: f.get_tensor(f"{index}.{k}") for k in meta.keys}
        return PreparedSpecimen(meta.specimen_id, input_ids, tensors, meta.input_size)
