"""Reuse image embeddings across checkpoints whose vision part is unchanged.

Many fine-tunes freeze the vision tower (and projector); it is ~60% of prefill compute. The
cache wraps the inner model's ``get_image_features`` (what every supported family's
``forward`` calls for images) on the instance: while ``generate`` runs a batch, the wrapper
knows the batch's specimen ids (``VisionCache.batch``). When every id has embeddings stored
for the current vision hash (``vision_hash.current_vision_hash``: content hash of the
resident vision tensors), the stored per-specimen features are returned and the tower does
not run; otherwise the tower runs and its output is split per image and stored (on the host,
under a byte budget) unless ``wanted()`` says no later checkpoint can use them (the next one's
prefetched vision hash differs, or the run has no next one). A new hash empties the cache. Outputs this code cannot split per image
(another transformers version, multi-tile images) switch the cache off with a one-time note.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import torch

from vieval_runner.records import LoadedModel

log = logging.getLogger("vieval")

_FIELDS = ("pooler_output", "deepstack_features")  # what the families' forward reads


def _per_image(value, n: int):
    """``value`` as n per-image parts and a tag to rebuild it, or None if not splittable."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        # one row per image (PaliGemma, LLaVA, Florence-2, single-tile InternVL)
        return [value[i : i + 1] for i in range(n)], "rows"
    tensors = isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value)
    if tensors and len(value) == n:  # Qwen: a tuple of tensors, one per image
        return list(value), "tuple"
    return None


def _split_layers(value, n: int):
    """Qwen3-VL deepstack features: a list (per layer) of per-image tuples."""
    if not isinstance(value, (list, tuple)):
        return None
    layers = [_per_image(layer, n) for layer in value]
    if any(layer is None or layer[1] != "tuple" for layer in layers):
        return None
    return [[layer[0][i] for layer in layers] for i in range(n)], "layers"


class VisionCache:
    """Per-specimen image embeddings for one vision hash (see the module docstring)."""

    def __init__(
        self,
        loaded: LoadedModel,
        vision_hash: Callable[[LoadedModel], str | None],
        ram_budget_mb: float = 1536,
    ) -> None:
        """``vision_hash(loaded)``: the resident vision part's content hash (None: unknown),
        the model stage's ``vision_hash.current_vision_hash``."""
        self.loaded = loaded
        self.vision_hash = vision_hash
        self.budget = int(ram_budget_mb * 2**20)
        self.bytes = 0
        self.digest: str | None = None
        self.entries: dict[str, dict] = {}
        self.hits = self.misses = 0  # specimens served from / added to the cache
        self.note: str | None = None  # why caching is off, if it is
        self._ids: list[str] | None = None
        self._layout: tuple | None = None  # (output class, {field: tag})
        self._full_noted = False
        # whether embeddings computed now can serve a later checkpoint (the runner knows)
        self.wanted: Callable[[], bool] = lambda: True
        inner = getattr(loaded.model, "model", loaded.model)
        original = getattr(inner, "get_image_features", None)
        if original is None:
            self._off("the model has no get_image_features")
            self._inner = None
            return
        self._inner, self._original = inner, original

        # same signature as the original: generate() passes it the kwargs it declares
        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            return self._features(*args, **kwargs)

        inner.get_image_features = get_image_features  # instance attribute: found first

    def close(self) -> None:
        """Put the model's own ``get_image_features`` back and drop the embeddings."""
        if self._inner is not None and "get_image_features" in vars(self._inner):
            del self._inner.get_image_features
        self._inner = None
        self.entries.clear()
        self.bytes = 0

    def _off(self, why: str) -> None:
        if self.note is None:
            self.note = f"vision embedding cache off: {why}"
            log.info(self.note)
        self.entries.clear()
        self.bytes = 0

    def refresh(self) -> str | None:
        """Read the resident vision hash; a different (or unknown) one empties the cache."""
        digest = self.vision_hash(self.loaded) if self.note is None else None
        if digest is None or digest != self.digest:
            self.entries.clear()
            self.bytes = 0
        self.digest = digest
        return digest

    def serves(self, specimen_ids: list[str]) -> bool:
        """Whether a batch of these specimens gets its image features from the cache (its
        pixel values are then not needed on the device)."""
        return (
            self.note is None
            and self.digest is not None
            and self._layout is not None
            and all(i in self.entries for i in specimen_ids)
        )

    @contextlib.contextmanager
    def batch(self, specimen_ids: list[str]) -> Iterator[None]:
        """The specimen ids of the batch ``generate`` is about to run, in batch order."""
        self._ids = list(specimen_ids)
        try:
            yield
        finally:
            self._ids = None

    # -- the wrapper ------------------------------------------------------------------------
    def _features(self, *args, **kwargs):
        ids, self._ids = self._ids, None  # one image pass per generate call
        if ids is not None and self.serves(ids):
            self.hits += len(ids)
            return self._rebuild([self.entries[i] for i in ids], self.loaded.device)
        args, kwargs = self._pixels_on_device(args, kwargs)
        if ids is None or self.digest is None or self.note is not None:
            return self._original(*args, **kwargs)
        out = self._original(*args, **kwargs)
        if self.wanted():  # else the copy to the host would serve nothing
            self._store(ids, out)
        return out

    def _pixels_on_device(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pixel values left on the host for a batch the cache was to serve go to the model's
        device (and dtype) after all, should the tower run."""

        def moved(value):
            if not isinstance(value, torch.Tensor) or value.device == self.loaded.device:
                return value
            dtype = self.loaded.dtype if value.is_floating_point() else value.dtype
            return value.to(self.loaded.device, dtype)

        if "pixel_values" in kwargs:
            kwargs = {**kwargs, "pixel_values": moved(kwargs["pixel_values"])}
        elif args:
            args = (moved(args[0]), *args[1:])
        return args, kwargs

    def _store(self, ids: list[str], out) -> None:
        n = len(ids)
        fields = {}
        if isinstance(out, (torch.Tensor, tuple, list)):  # older APIs return the features
            fields["__self__"] = out
        else:
            for name in _FIELDS:
                value = getattr(out, name, None)
                if value is not None:
                    fields[name] = value
        if "__self__" not in fields and "pooler_output" not in fields:
            return self._off(f"unknown image feature output {type(out).__name__}")
        parts, tags = {}, {}
        for name, value in fields.items():
            split = _split_layers(value, n) if name == "deepstack_features" else None
            split = split or _per_image(value, n)
            if split is None:
                return self._off(f"cannot split {name} of {type(out).__name__} per image")
            parts[name], tags[name] = split
        self._layout = (None if "__self__" in fields else type(out), tags)
        for k, specimen_id in enumerate(ids):
            if specimen_id in self.entries:
                continue
            entry = {name: _to_host(parts[name][k]) for name in parts}
            size = _nbytes(entry)
            if self.bytes + size > self.budget:
                if not self._full_noted:
                    log.info("vision embedding cache full (%d MB)", self.budget >> 20)
                    self._full_noted = True
                return
            self.entries[specimen_id] = entry
            self.bytes += size
            self.misses += 1

    def _rebuild(self, entries: list[dict], device: torch.device):
        cls, tags = self._layout  # type: ignore[misc]
        values = {}
        for name, tag in tags.items():
            per = [e[name] for e in entries]
            if tag == "rows":
                values[name] = torch.cat(per, dim=0).to(device)
            elif tag == "tuple":
                values[name] = _moved_together(per, device)
            else:  # layers: per image a list over layers -> per layer a tuple over images
                values[name] = [
                    _moved_together([p[layer] for p in per], device) for layer in range(len(per[0]))
                ]
        if cls is None:
            return values["__self__"]
        return cls(**values)


def _moved_together(parts: list[torch.Tensor], device: torch.device) -> tuple:
    """Per-image tensors (same trailing shape) on ``device`` with one copy, not one each."""
    if len({(p.shape[1:], p.dtype) for p in parts}) != 1:
        return tuple(p.to(device) for p in parts)
    joined = torch.cat(parts, dim=0).to(device)
    return tuple(joined.split([p.shape[0] for p in parts], dim=0))


def _to_host(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return [_to_host(v) for v in value]


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return sum(_nbytes(v) for v in value)
