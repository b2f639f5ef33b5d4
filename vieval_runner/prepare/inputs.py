"""Prompt building and per-specimen processor outputs, computed once per run.

``prepare`` decodes each image and runs the processor on chunks of specimens, one call per
chunk split back per specimen where the family has a ``prepare_split`` rule (else one call per
specimen), optionally on a thread pool; it keeps the results in RAM or, past a budget, on disk
(``prepared_cache``); ``generation`` batches them for every checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vieval_runner.families import FAMILIES
from vieval_runner.records import SEQ_KEYS, LoadedModel, PreparedSpecimen, Specimen

if TYPE_CHECKING:
    from vieval_runner.prepare.ram_budget import PreparedSet

log = logging.getLogger("vieval")

_DROP_KEYS = {"labels"}


def build_prompt(
    loaded: LoadedModel,
    specimen: Specimen,
    template: str | None = None,
    system_prompt: str | None = None,
) -> str:
    """The family's (or the given) template filled with the specimen's prompt, as model text."""
    facts = FAMILIES[loaded.family]
    template = template if template is not None else facts["templates"][specimen.task]
    # replace, not str.format: templates legitimately contain JSON braces
    text = template.replace("{prompt}", specimen.prompt)
    processor = loaded.processor
    if facts["chat_template"]:
        messages = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": system_prompt})
        content = [{"type": "image"}, {"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prefix = "" if system_prompt is None else system_prompt + " "
    if not facts.get("image_token_in_prompt", True):  # Florence-2 places the image itself
        return f"{prefix}{text}"
    # PaliGemma-style: image placeholder first; the processor adds <bos> and the "\n"
    image_token = getattr(processor, "image_token", "<image>")
    return f"{image_token}{prefix}{text}"


def input_size_for(loaded: LoadedModel, processor_outputs, index: int) -> tuple[int, int] | None:
    """``(w, h)`` of the image as the model saw it (Qwen: grid x patch), else None.

    Qwen2.5-VL answers in absolute pixels of this resized input, so parsers need it.
    """
    grid = processor_outputs.get("image_grid_thw") if hasattr(processor_outputs, "get") else None
    if grid is None or not loaded.family.startswith("qwen"):
        return None
    image_processor = loaded.processor.image_processor
    patch = int(image_processor.patch_size)
    _, h, w = (int(v) for v in grid[index])
    return (w * patch, h * patch)


def prepare_one(
    loaded: LoadedModel,
    specimen: Specimen,
    template: str | None = None,
    system_prompt: str | None = None,
) -> PreparedSpecimen:
    """One specimen's image decoded and run through the processor."""
    nested = FAMILIES[loaded.family].get("nested_images", False)
    prompt = build_prompt(loaded, specimen, template, system_prompt)
    image = specimen.load_image()
    # padding=True adds nothing to one prompt; every preparation call pads the same way, so
    # the fast tokenizer's padding state is set once, then only read by worker threads
    # (changing it while another thread encodes raises "Already borrowed")
    outputs = loaded.processor(
        images=[[image]] if nested else [image], text=[prompt], padding=True, return_tensors="pt"
    )
    tensors = {}
    for key, value in outputs.items():
        if key in _DROP_KEYS or not isinstance(value, torch.Tensor):
            continue
        tensors[key] = value[0] if key in SEQ_KEYS else value
    input_ids = tensors.pop("input_ids")
    size = input_size_for(loaded, outputs, 0)
    return PreparedSpecimen(specimen.specimen_id, input_ids, tensors, size)


_CHUNK = 16  # at most this many specimens per processor call (where outputs split back)


def prepare_chunk(
    loaded: LoadedModel,
    specimens: Sequence[Specimen],
    template: str | None = None,
    system_prompt: str | None = None,
    batched: bool = True,
) -> list[PreparedSpecimen]:
    """Several specimens through ONE processor call, split back per specimen.

    The processor's per-call overhead (argument merging and validation) is most of a small
    image's cost, so one call per chunk prepares 2-3x faster. The outputs are exactly what
    ``prepare_one`` gives (padding removed); families without a ``prepare_split`` rule, and
    outputs the rule does not cover, go one specimen at a time (as all do with ``batched=False``).
    """
    try:
        prepared = _prepare_batched(loaded, specimens, template, system_prompt) if batched else None
    except _NotSplittable:
        prepared = None
    if prepared is None:
        prepared = [prepare_one(loaded, s, template, system_prompt) for s in specimens]
    return prepared


def _prepare_batched(loaded, specimens, template, system_prompt) -> list[PreparedSpecimen] | None:
    """One processor call split per specimen; None without a rule (``_NotSplittable``: an
    output the rule does not cover)."""
    rule = FAMILIES[loaded.family].get("prepare_split")
    if rule is None or len(specimens) < 2:
        return None
    prompts = [build_prompt(loaded, s, template, system_prompt) for s in specimens]
    images = [s.load_image() for s in specimens]
    if FAMILIES[loaded.family].get("nested_images", False):
        images = [[image] for image in images]
    outputs = loaded.processor(images=images, text=prompts, padding=True, return_tensors="pt")
    return _split(loaded, specimens, outputs, rule)


class _NotSplittable(Exception):
    """An output of a batched processor call has no per-specimen layout the rule knows."""


def _split(loaded, specimens: Sequence[Specimen], outputs, rule: str) -> list[PreparedSpecimen]:
    n = len(specimens)
    kept = outputs["attention_mask"].bool()  # padding is wherever the mask is 0
    rows = _pixel_rows(loaded, outputs, rule, kept, n)  # rules that concatenate pixel rows
    tiles = None
    if rule == "tiles":  # SmolVLM: (image, tile, ...) padded with empty tiles at the end
        mask = outputs.get("pixel_attention_mask")
        if mask is None or mask.shape[0] != n:
            raise _NotSplittable("pixel_attention_mask")
        tiles = mask.flatten(2).any(-1).sum(-1).tolist()
    prepared = []
    for i, specimen in enumerate(specimens):
        tensors = {}
        for key, value in outputs.items():
            if key in _DROP_KEYS or not isinstance(value, torch.Tensor):
                continue
            if key in SEQ_KEYS:
                tensors[key] = value[i][kept[i]]
            elif rows is not None and key == "pixel_values":
                tensors[key] = value[rows[i] : rows[i + 1]].clone()
            elif tiles is not None and key in ("pixel_values", "pixel_attention_mask"):
                tensors[key] = value[i : i + 1, : tiles[i]].clone()
            elif value.shape[0] == n:  # one row per image (own memory: no view of the batch)
                tensors[key] = value[i : i + 1].clone()
            else:
                raise _NotSplittable(key)
        input_ids = tensors.pop("input_ids")
        size = input_size_for(loaded, outputs, i)
        prepared.append(PreparedSpecimen(specimen.specimen_id, input_ids, tensors, size))
    return prepared


def _pixel_rows(loaded, outputs, rule: str, kept: torch.Tensor, n: int) -> list[int] | None:
    """Where each specimen's rows start in a concatenated ``pixel_values`` (None: the rule
    does not concatenate)."""
    if rule == "grid":  # Qwen: pixel patch rows of all images, t*h*w rows per image
        grid = outputs.get("image_grid_thw")
        if grid is None or grid.shape[0] != n:
            raise _NotSplittable("image_grid_thw")
        counts = grid.prod(-1)
    elif rule == "image_tokens":  # InternVL: tiles per image = its image tokens / per tile
        per_tile = getattr(loaded.processor, "image_seq_length", None)
        token = getattr(loaded.processor, "image_token_id", None)
        if not per_tile or token is None:
            raise _NotSplittable("image_seq_length")
        counts = ((outputs["input_ids"] == token) & kept).sum(-1) // int(per_tile)
    else:
        return None
    rows = [0, *torch.cumsum(counts, 0).tolist()]
    if "pixel_values" not in outputs or rows[-1] != outputs["pixel_values"].shape[0]:
        raise _NotSplittable("pixel_values")
    return rows


def same_preparation(a: PreparedSpecimen, b: PreparedSpecimen) -> bool:
    """Whether two preparations of a specimen are identical (ids, every tensor, input size)."""
    if a.specimen_id != b.specimen_id or a.input_size != b.input_size:
        return False
    if not _same_tensor(a.input_ids, b.input_ids) or a.tensors.keys() != b.tensors.keys():
        return False
    return all(_same_tensor(a.tensors[k], b.tensors[k]) for k in a.tensors)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def prepare(
    loaded: LoadedModel,
    specimens: Sequence[Specimen],
    template: str | None = None,
    system_prompt: str | None = None,
    *,
    workers: int = 1,
    ram_budget_mb: float | None = None,
    cache_dir: str | Path | None = None,
    into: PreparedSet | None = None,
    cancel: threading.Event | None = None,
    on_first: Callable[[list[PreparedSpecimen]], None] | None = None,
    wait_writes: bool = True,
    pixel_dtype: torch.dtype | None = None,
) -> list[PreparedSpecimen] | PreparedSet:
    """Processor outputs of each specimen, computed once and reusable across checkpoints.

    ``workers`` > 1 decodes images and runs the processor on a thread pool (order kept, at
    most ``workers + 1`` chunks of at most 8 specimens waiting). With ``ram_budget_mb`` the result is a
    ``PreparedSet`` holding tensors in RAM up to the budget and the rest in safetensors
    chunks under ``cache_dir`` (default: the system temp folder); without it, a plain list.
    ``into``: fill this (empty) ``PreparedSet`` instead (``prepared_reuse`` passes a persisting
    one); the budget and folder arguments are then ignored. ``cancel``: once set, stop with
    ``PreparationCancelled`` (the runner prepares while the weights load; a failed load stops it).
    ``on_first(items)``: called with the first chunk's results as soon as they exist.
    ``wait_writes``: False returns before a persisting set's background writes are done.
    ``pixel_dtype``: floating-point outputs (pixel values) kept in this dtype, the model's:
    the cast ``to_device`` would make on every batch and checkpoint, made once (the same
    rounding), at half the memory, disk and copy for bf16.
    """
    from vieval_runner.prepare.ram_budget import PreparedSet

    out: list | PreparedSet
    if into is not None:
        out = into
    else:
        out = (
            []
            if ram_budget_mb is None
            else PreparedSet(int(ram_budget_mb * 2**20), cache_dir, expected_count=len(specimens))
        )
    chunks = _chunks(specimens, cancel, _chunk_size(specimens, workers))
    first, batched = next(chunks, None), True
    if first is not None:
        items, batched = _first_chunk(loaded, first, template, system_prompt)
        items = [in_dtype(item, pixel_dtype) for item in items]
        for item in items:
            out.append(item)
        if on_first is not None:
            on_first(items)
    if workers <= 1:
        for chunk in chunks:
            for item in _chunk_in(pixel_dtype, loaded, chunk, template, system_prompt, batched):
                out.append(item)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="vieval-prepare") as pool:
            window: deque[Future] = deque()
            for chunk in chunks:
                job = (pixel_dtype, loaded, chunk, template, system_prompt, batched)
                window.append(pool.submit(_chunk_in, *job))  # the cast on the workers too
                if len(window) > workers:  # bounded: memory stays under the budget
                    for item in window.popleft().result():
                        out.append(item)
            while window:
                for item in window.popleft().result():
                    out.append(item)
    return out if isinstance(out, list) else out.finish(wait_writes)


def in_dtype(item: PreparedSpecimen, dtype: torch.dtype | None) -> PreparedSpecimen:
    """``item`` with its floating-point tensors in ``dtype`` (None: as it is)."""
    if dtype is None:
        return item
    tensors = {
        k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v
        for k, v in item.tensors.items()
    }
    return PreparedSpecimen(item.specimen_id, item.input_ids, tensors, item.input_size)


def _chunk_in(pixel_dtype, *job) -> list[PreparedSpecimen]:
    return [in_dtype(item, pixel_dtype) for item in prepare_chunk(*job)]


def _first_chunk(loaded, chunk, template, system_prompt) -> tuple[list[PreparedSpecimen], bool]:
    """The first chunk, and whether batched processor calls serve the rest: they must give
    exactly the one-specimen outputs of its first and last specimen, else one at a time.

    It runs on the caller's thread, so the tokenizer's padding state is set before any
    worker thread encodes (see ``prepare_one``).
    """
    if FAMILIES[loaded.family].get("prepare_split") is None or len(chunk) < 2:
        return [prepare_one(loaded, s, template, system_prompt) for s in chunk], False
    ends = sorted({0, len(chunk) - 1})
    singles = {i: prepare_one(loaded, chunk[i], template, system_prompt) for i in ends}
    try:
        items = _prepare_batched(loaded, chunk, template, system_prompt)
    except _NotSplittable as exc:
        items, why = None, f"no per-specimen layout for {exc}"
    else:
        why = "they differ from one specimen's"
    if items is not None and all(same_preparation(items[i], singles[i]) for i in ends):
        return items, True
    log.warning(
        "%s: batched processor outputs unusable (%s); preparing one specimen at a time",
        loaded.family,
        why,
    )
    return [prepare_one(loaded, s, template, system_prompt) for s in chunk], False


class PreparationCancelled(Exception):
    """``prepare`` was stopped through its ``cancel`` event."""


def _chunk_size(specimens: Iterable[Specimen], workers: int) -> int:
    """Specimens per processor call: ``_CHUNK`` on one thread; with workers at most half that
    (chunks in flight are held outside the RAM budget) and small enough that a known-size
    split gives every worker two chunks (decoding large images, most of their cost, runs in
    parallel across chunks only)."""
    if workers <= 1:
        return _CHUNK
    largest = _CHUNK // 2
    if not hasattr(specimens, "__len__"):
        return largest
    return max(2, min(largest, len(specimens) // (2 * workers)))


def _chunks(specimens: Iterable[Specimen], cancel: threading.Event | None, size: int):
    """``specimens`` in chunks of ``size``; checks ``cancel`` before taking each one."""
    chunk: list[Specimen] = []
    for specimen in specimens:
        if cancel is not None and cancel.is_set():
            raise PreparationCancelled("preparation stopped")
        chunk.append(specimen)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
