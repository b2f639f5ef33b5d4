"""Prompt building and per-specimen processor outputs, computed once per run.

``prepare`` decodes each image and runs the processor once per specimen (optionally on a
thread pool), keeping the results in RAM or, past a budget, on disk (``prepared_cache``);
``generation`` batches them for every checkpoint.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .models import FAMILIES, LoadedModel, input_size_for
from .records import Specimen

if TYPE_CHECKING:
    from .prepared_cache import PreparedSet

# processor outputs aligned with the token sequence: padded per batch; the rest are concatenated
SEQ_KEYS = {"input_ids": "pad", "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0}
_DROP_KEYS = {"labels"}


@dataclass
class PreparedSpecimen:
    """One specimen's processor outputs (batch dim removed for sequence tensors)."""

    specimen_id: str
    input_ids: torch.Tensor  # (seq,)
    # every other processor output, as the processor gave it (pixels, grids, type ids)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    input_size: tuple[int, int] | None = None

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[0])


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
    outputs = loaded.processor(
        images=[[image]] if nested else [image], text=[prompt], return_tensors="pt"
    )
    tensors = {}
    for key, value in outputs.items():
        if key in _DROP_KEYS or not isinstance(value, torch.Tensor):
            continue
        tensors[key] = value[0] if key in SEQ_KEYS else value
    input_ids = tensors.pop("input_ids")
    size = input_size_for(loaded, outputs, 0)
    return PreparedSpecimen(specimen.specimen_id, input_ids, tensors, size)


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
) -> list[PreparedSpecimen] | PreparedSet:
    """Processor outputs of each specimen, computed once and reusable across checkpoints.

    ``workers`` > 1 decodes images and runs the processor on a thread pool (order kept, at
    most ``2 * workers`` results waiting). With ``ram_budget_mb`` the result is a
    ``PreparedSet`` holding tensors in RAM up to the budget and the rest in safetensors
    chunks under ``cache_dir`` (default: the system temp folder); without it, a plain list.
    ``into``: fill this (empty) ``PreparedSet`` instead (``prepared_reuse`` passes a persisting
    one); the budget and folder arguments are then ignored. ``cancel``: once set, stop with
    ``PreparationCancelled`` (the runner prepares while the weights load; a failed load stops it).
    """
    from .prepared_cache import PreparedSet

    out: list | PreparedSet
    if into is not None:
        out = into
    else:
        out = [] if ram_budget_mb is None else PreparedSet(int(ram_budget_mb * 2**20), cache_dir)
    items = _until(cancel, specimens)
    if workers <= 1:
        for specimen in items:
            out.append(prepare_one(loaded, specimen, template, system_prompt))
    else:
        # the first call on this thread settles the tokenizer's padding/truncation state,
        # which later calls only read (concurrent writes would raise "Already borrowed")
        first = next(items, None)
        if first is not None:
            out.append(prepare_one(loaded, first, template, system_prompt))
        with ThreadPoolExecutor(workers, thread_name_prefix="vieval-prepare") as pool:
            window: deque[Future] = deque()
            for specimen in items:
                window.append(pool.submit(prepare_one, loaded, specimen, template, system_prompt))
                if len(window) >= 2 * workers:  # bounded: memory stays under the budget
                    out.append(window.popleft().result())
            while window:
                out.append(window.popleft().result())
    return out if isinstance(out, list) else out.finish()


class PreparationCancelled(Exception):
    """``prepare`` was stopped through its ``cancel`` event."""


def _until(cancel: threading.Event | None, specimens: Sequence[Specimen]):
    for specimen in specimens:
        if cancel is not None and cancel.is_set():
            raise PreparationCancelled("preparation stopped")
        yield specimen
