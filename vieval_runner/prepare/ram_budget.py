"""Prepared specimens under a RAM budget: the first ones in memory, the rest on disk.

A Qwen2-VL image at 448 px is ~4.8 MB of float32 pixel values (1,024 patches x 1,176; half
in the bf16 that ``prepare``'s ``pixel_dtype`` keeps for a bf16 model), so
10,000 specimens would be 48 GB in RAM. ``PreparedSet`` keeps specimens in memory until their
tensors reach ``ram_budget_bytes``, then writes the rest in chunks of safetensors files (one
file per chunk, keys ``<index>.<tensor>``) and reads a specimen back per batch through
safetensors' memory map. Prompt lengths, ids and input sizes stay in memory (generation sorts
by them). The folder is temporary: removed by ``close()`` or when the set is garbage-collected.

With ``persist_max_bytes`` every specimen is also written to the chunks (the ones kept in RAM
too) while the chunks stay within that many bytes, so the finished folder holds the whole split
(``persisted``) and ``prepared_reuse`` can keep it for later runs; ``from_chunks`` opens such a
folder again (every specimen then read per batch from disk). Chunks only kept for later runs
(every specimen in them is also in RAM) are written on a background thread while preparation
goes on; ``finish()`` waits for them, and a failed one only makes the set not ``persisted``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, overload

import torch

if TYPE_CHECKING:
    from vieval_runner.records import PreparedSpecimen


@dataclass(frozen=True)
class _Meta:
    specimen_id: str
    prompt_len: int
    input_size: tuple[int, int] | None
    keys: tuple[str, ...]  # the specimen's tensor names besides input_ids
    chunk: int  # chunk file holding it; -1: only in memory


RUN_PREFIX = "vieval-prepared-"


def run_folder_name() -> str:
    """``vieval-prepared-<host>-<pid>-<random>``: whose it is, so the folders of a run that was
    killed can be told apart from live ones and removed (``prepared_reuse.reap_dead_runs``)."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"
    return f"{RUN_PREFIX}{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


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
        persist_max_bytes: int | None = None,
        expected_count: int | None = None,
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
        self._pending_extra = 0  # pending bytes not also held in memory (persist mode)
        self._persist = persist_max_bytes is not None
        self._persist_max = persist_max_bytes or 0
        self._expected = expected_count  # to skip writing a split that will not fit the bound
        self.persist_dropped = False  # persisting stopped: too big, or a write failed
        self.persist_error: BaseException | None = None
        self._writer = ThreadPoolExecutor(1, "vieval-persist") if self._persist else None
        self._writes: list[Future] = []
        self.saving: Future | None = None  # keeping the chunks for later runs (prepared_reuse)
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
        in_ram = not self._spilling and self.ram_bytes + size <= self.ram_budget_bytes
        if in_ram:
            self._memory[index] = prepared
            self.ram_bytes += size
        else:
            if not self._spilling:
                self._check_room(size, index)
            self._spilling = True
        if (
            self._persist
            and index == 0
            and self._expected
            and size * self._expected > (self._persist_max)
        ):
            # estimated from the first specimen: writing most of it only to drop it wastes disk
            self._persist, self.persist_dropped = False, True
        if self._persist and self.disk_bytes + self._pending_bytes + size > self._persist_max:
            self._persist, self.persist_dropped = False, True  # too big to keep: stop writing
        chunk = -1
        if self._persist or not in_ram:
            if self._pending_bytes + size > self._chunk_bytes:
                self._flush()  # pending bytes stay under max(chunk_bytes, one specimen)
            self._pending[index] = prepared
            self._pending_bytes += size
            self._pending_extra += 0 if in_ram else size
            chunk = len(self._chunks)
        self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes + self._pending_extra)
        self._meta.append(
            _Meta(prepared.specimen_id, prepared.prompt_len, prepared.input_size, keys, chunk)
        )
        if self._pending_bytes >= self._chunk_bytes:
            self._flush()

    def finish(self, wait_writes: bool = True) -> PreparedSet:
        """Write the last partial chunk; complete after this. ``wait_writes``: also wait for
        the background writes (they hold specimens this run reads from RAM, kept only for
        later runs; ``wait_for_writes`` waits for them later)."""
        self._flush()
        if wait_writes:
            self._wait_writes()
        return self

    def wait_for_writes(self) -> None:
        """Wait for the background chunk writes (``persisted`` is final after this)."""
        self._wait_writes()

    def _wait_writes(self) -> None:
        for future in self._writes:
            try:
                future.result()
            except Exception as exc:  # e.g. a full disk: this run has them in RAM anyway
                self.persist_dropped, self.persist_error = True, self.persist_error or exc
        self._writes = []
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _root(self) -> Path:
        return Path(self._cache_dir) if self._cache_dir else Path(tempfile.gettempdir())

    def _check_room(self, size: int, index: int) -> None:
        """Before the first specimen goes to disk: the rest of the split, estimated at this
        specimen's size, must fit the free space there (a clear error now, not a full disk
        halfway through preparing). Unknown split size: no estimate, no check."""
        if self._expected is None:
            return
        from vieval_runner.records import DataError

        needed = size * (self._expected - index)
        root = self._root()
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if needed > free:
            raise DataError(
                f"{root}: the prepared split needs about {needed / 1e9:.1f} GB on disk beyond "
                f"the {self.ram_budget_bytes / 2**20:.0f} MB held in RAM "
                f"(prepare_cache_ram_mb), but only {free / 1e9:.1f} GB are free there; set "
                "cache_dir to a folder on a larger disk, or raise prepare_cache_ram_mb"
            )

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        if self.folder is None:
            root = self._root()
            root.mkdir(parents=True, exist_ok=True)
            self.folder = root / run_folder_name()
            self.folder.mkdir()
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        tensors = {}
        for index, p in self._pending.items():
            tensors[f"{index}.input_ids"] = p.input_ids.contiguous()
            for key, value in p.tensors.items():
                tensors[f"{index}.{key}"] = value.contiguous()
        path = self.folder / f"chunk-{len(self._chunks):05d}.safetensors"
        if self._writer is not None and all(i in self._memory for i in self._pending):
            # only kept for later runs (this run reads them from RAM): written in the background
            self._writes.append(self._writer.submit(save_file, tensors, str(path)))
        else:
            save_file(tensors, str(path))
        self._chunks.append(path)
        self.disk_bytes += self._pending_bytes
        self._pending, self._pending_bytes, self._pending_extra = {}, 0, 0

    @classmethod
    def from_chunks(
        cls,
        folder: Path,
        chunks: list[Path],
        metas: list[tuple[str, int, tuple[int, int] | None, tuple[str, ...], int]],
        owned: bool,
    ) -> PreparedSet:
        """A finished set over existing chunk files; ``metas``: per specimen ``(id,
        prompt_len, input_size, tensor keys, chunk)``. ``owned``: ``close()`` removes
        ``folder`` (False: the folder belongs to someone else, e.g. the reuse cache)."""
        prepared = cls(0)
        prepared._meta = [_Meta(*m) for m in metas]
        prepared._chunks = list(chunks)
        prepared._spilling = True
        prepared.folder = Path(folder)
        prepared.disk_bytes = sum(p.stat().st_size for p in prepared._chunks)
        if owned:
            prepared._finalizer = weakref.finalize(prepared, shutil.rmtree, prepared.folder, True)
        return prepared

    @property
    def persisted(self) -> bool:
        """Every specimen is in the chunk files (a persisting set, finished, within its bound)."""
        complete = bool(self._meta) and not self._pending and not self._writes
        return complete and not self.persist_dropped and all(m.chunk >= 0 for m in self._meta)

    @property
    def chunk_files(self) -> list[Path]:
        """The chunk files written so far, in order."""
        return list(self._chunks)

    def metas(self) -> list[tuple[str, int, tuple[int, int] | None, tuple[str, ...], int]]:
        """Per specimen ``(id, prompt_len, input_size, tensor keys, chunk)`` (``from_chunks``)."""
        return [(m.specimen_id, m.prompt_len, m.input_size, m.keys, m.chunk) for m in self._meta]

    def close(self) -> None:
        """Remove the on-disk chunks (also done when the set is garbage-collected), once a
        save for later runs has linked them."""
        if self.saving is not None:
            self.saving.result()
        self._wait_writes()
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
        """How many specimens are read from disk (not held in memory)."""
        return len(self._meta) - len(self._memory)

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

    def hold_in_memory(self, budget_bytes: int) -> int:
        """Read specimens from the chunks into memory, in order, while they fit ``budget_bytes``
        (a reused entry: read once instead of once per batch and checkpoint); how many."""
        from safetensors import safe_open

        from vieval_runner.records import PreparedSpecimen

        by_chunk: dict[int, list[int]] = {}
        for index, meta in enumerate(self._meta):
            if index not in self._memory and meta.chunk >= 0:
                by_chunk.setdefault(meta.chunk, []).append(index)
        held = 0
        for chunk, indices in sorted(by_chunk.items()):
            with safe_open(str(self._chunks[chunk]), framework="pt") as f:
                for index in indices:
                    meta = self._meta[index]
                    prepared = PreparedSpecimen(
                        meta.specimen_id,
                        f.get_tensor(f"{index}.input_ids"),
                        {k: f.get_tensor(f"{index}.{k}") for k in meta.keys},
                        meta.input_size,
                    )
                    size = nbytes(prepared)
                    if self.ram_bytes + size > budget_bytes:
                        return held
                    self._memory[index] = prepared
                    self.ram_bytes += size
                    held += 1
        return held

    def _load(self, index: int) -> PreparedSpecimen:
        from safetensors import safe_open

        from vieval_runner.records import PreparedSpecimen

        meta = self._meta[index]
        with safe_open(str(self._chunks[meta.chunk]), framework="pt") as f:
            input_ids = f.get_tensor(f"{index}.input_ids")
            tensors: dict[str, torch.Tensor] = {k: f.get_tensor(f"{index}.{k}") for k in meta.keys}
        return PreparedSpecimen(meta.specimen_id, input_ids, tensors, meta.input_size)
