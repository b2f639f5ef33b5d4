"""Batched greedy generation over the prepared specimens (``prepare.inputs`` makes them).

Processor outputs are computed once per specimen (``prepare``, on a thread pool, in RAM up
to a budget and on disk beyond it) and reused for every checkpoint. ``generate`` sorts by
prompt length (longest first, so out-of-memory shows at once), pads each batch itself (left
for decoder-only models, right for encoder-decoder), decodes only the new tokens and returns
results in specimen order. Generation stays on the calling thread (one batch: ``decoding``, the lean greedy
loop or HF ``generate``); loading/collating the next batch and decoding (plus the caller's
``on_batch``, e.g. parsing) of the previous one run on two helper threads meanwhile.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vieval_runner.families import FAMILIES
from vieval_runner.generate.decoding import TOKENIZER_LOCK, end_ids, generate_tokens, pad_id
from vieval_runner.generate.options import GenerateOptions
from vieval_runner.records import SEQ_KEYS, LoadedModel, PreparedSpecimen


@dataclass
class GeneratedText:
    """The decoded new tokens of one specimen."""

    text: str
    input_size: tuple[int, int] | None
    n_new_tokens: int  # tokens before the end token
    truncated: bool  # hit max_new_tokens without an end token
    confidence: float | None = None  # exp(mean token log-probability); with options.scores
    # with options.scores, per content token: its log-probability (float32 values) and the
    # character offset in ``text`` where it ends (per-box scores: ``results.box_token_scores``)
    token_logprobs: list[float] | None = None
    token_ends: list[int] | None = None


def collate(loaded: LoadedModel, batch: Sequence[PreparedSpecimen]) -> dict[str, torch.Tensor]:
    """Pad sequence tensors to the batch's longest prompt and concatenate the others.

    Qwen: pixel patch rows concatenate, ``image_grid_thw`` rows stack; PaliGemma, LLaVA,
    Florence-2: pixel images stack; InternVL: tiles concatenate; SmolVLM: per-image tile lists
    are zero-padded to the longest. Padding side follows the family (left for decoder-only,
    right for encoder-decoder).
    """
    left = FAMILIES[loaded.family]["padding_side"] == "left"
    width = max(p.prompt_len for p in batch)
    pad_value = pad_id(loaded)
    out: dict[str, torch.Tensor] = {}
    for key, fill in SEQ_KEYS.items():
        rows = []
        for p in batch:
            seq = p.input_ids if key == "input_ids" else p.tensors.get(key)
            if seq is None:
                break
            pad = torch.full(
                (width - seq.shape[0],), pad_value if fill == "pad" else fill, dtype=seq.dtype
            )
            rows.append(torch.cat([pad, seq] if left else [seq, pad]))
        else:
            out[key] = torch.stack(rows)
    for key in batch[0].tensors:
        if key not in SEQ_KEYS:
            out[key] = _pad_cat([p.tensors[key] for p in batch])
    return out


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0, zero-padding other dims to the largest (as processors batch).

    SmolVLM/Idefics3: ``pixel_values`` (1, tiles, 3, H, W) with a per-image tile count; the
    model drops all-zero padding tiles, and ``pixel_attention_mask`` pads with False.
    """
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            grown = t.new_zeros((t.shape[0], *shape))
            grown[tuple(slice(0, n) for n in t.shape)] = t
            t = grown
        padded.append(t)
    return torch.cat(padded, dim=0)


def token_ends(tokenizer, content: list[int], text: str) -> list[int]:
    """Where each token of ``content`` ends in ``text`` (= ``tokenizer.decode(content)``):
    ``len(decode(content[:i + 1]))``, a token that completes no character (part of a
    multi-byte character) ending where the previous one did. Call under ``TOKENIZER_LOCK``.

    The fast tokenizer's incremental decoder gives this in one pass; where its pieces do not
    add up to ``text`` exactly (a decoder or clean-up it does not mirror), every prefix is
    decoded instead (quadratic, but exact by construction)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        try:
            from tokenizers.decoders import DecodeStream

            stream, pieces, ends, pos = DecodeStream(skip_special_tokens=False), [], [], 0
            for token in content:
                piece = stream.step(backend, token) or ""
                pieces.append(piece)
                pos += len(piece)
                ends.append(pos)
            if "".join(pieces) == text:
                return ends
        except Exception:  # an older tokenizers or a decoder it cannot stream: slow path
            pass
    prefixes = [content[: i + 1] for i in range(len(content))]
    decoded = tokenizer.batch_decode(
        prefixes, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    ends, last = [], 0
    for piece in decoded:
        # a prefix ending inside a multi-byte character decodes to U+FFFD: not yet in text
        last = max(last, len(piece) if text.startswith(piece) else _common(piece, text))
        ends.append(last)
    return ends


def _common(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _decode_rows(
    loaded: LoadedModel,
    new_tokens: torch.Tensor,
    max_new_tokens: int,
    lead: int | None = None,
    logprobs: torch.Tensor | None = None,
) -> list[tuple[str, int, bool, float | None, list[float] | None, list[int] | None]]:
    """``(text, n_tokens, truncated, confidence, token_logprobs, token_ends)`` per row;
    ``lead``: a forced first token to drop; ``logprobs`` (aligned with ``new_tokens``):
    confidence = exp(mean log-probability) of the content tokens, and per content token its
    log-probability and end offset in ``text``; all None without them."""
    tokenizer = loaded.processor.tokenizer
    ends = set(end_ids(loaded))
    rows = []
    for r, row in enumerate(new_tokens.tolist()):
        stop = next((i for i, tok in enumerate(row) if tok in ends), None)
        content = row if stop is None else row[:stop]
        first = 0
        if lead is not None and content[:1] == [lead]:
            content, first = content[1:], 1
        confidence = per_token = offsets = None
        if logprobs is not None:
            values = logprobs[r, first : first + len(content)].float()
            per_token = values.tolist()
            if content:
                mean = float(values.mean())
                confidence = math.exp(mean) if math.isfinite(mean) else None
        # keep special tokens: Qwen2-VL boxes and PaliGemma <locNNNN> are (special) tokens
        with TOKENIZER_LOCK:
            text = tokenizer.decode(
                content, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            if per_token is not None:
                offsets = token_ends(tokenizer, content, text)
        truncated = stop is None and len(row) >= max_new_tokens
        rows.append((text, len(content), truncated, confidence, per_token, offsets))
    return rows


def auto_batch_size(loaded: LoadedModel, n: int) -> int:
    """First batch size for ``batch_size: auto``: 512 on CUDA (capped at the split), else 8.

    No separate probe run: batches go longest prompt first, so the first ``generate`` call
    is the probe; it halves on out-of-memory and the size that fits is kept (``memo``).
    """
    if loaded.device.type == "cuda":
        return max(1, min(512, n))
    return 8


def _load_batch(
    loaded: LoadedModel, prepared: Sequence[PreparedSpecimen], chunk: list[int]
) -> tuple[list[PreparedSpecimen], dict[str, torch.Tensor]]:
    batch = [prepared[i] for i in chunk]  # a disk-backed set reads them here
    return batch, collate(loaded, batch)


def _prompt_lens(prepared: Sequence[PreparedSpecimen]) -> list[int]:
    lens = getattr(prepared, "prompt_lens", None)  # PreparedSet: without reading the tensors
    return list(lens) if lens is not None else [p.prompt_len for p in prepared]


def generate(
    loaded: LoadedModel,
    prepared: Sequence[PreparedSpecimen],
    batch_size: int | str = 8,
    max_new_tokens: int = 64,
    forced_texts: Sequence[str | None] | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    on_batch: Callable[[list[int], list[GeneratedText]], None] | None = None,
    options: GenerateOptions | None = None,
    probe: bool = False,
    memo: dict | None = None,
) -> list[GeneratedText]:
    """Greedy generation in length-sorted batches; results in ``prepared`` order.

    ``forced_texts`` (aligned with ``prepared``) scripts the outputs through the real
    generate/decode path (tests, demo). On out-of-memory the batch is halved and retried;
    no specimen is dropped (``probe``: ``batch_size`` is a first guess, so halving is
    expected and not warned about). ``progress(n)`` is called with the number finished per
    batch; ``on_batch(indices, texts)`` with each batch's results, on the decoding thread
    while the next batch generates (its exceptions surface here). ``memo["batch_size"]``
    receives the batch size that fitted. ``batch_size="auto"``: see ``auto_batch_size``.
    """
    options = options or GenerateOptions()
    if batch_size == "auto":
        batch_size, probe = auto_batch_size(loaded, len(prepared)), True
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (
        batch_size > 1
        and loaded.device.type == "cuda"
        and not FAMILIES[loaded.family].get("batches_on_cuda", True)
    ):
        # correctness first: this family's batched outputs on CUDA differ from one-at-a-time
        warnings.warn(
            f"{loaded.family}: batched generation on CUDA is not batch-invariant yet; "
            "generating one specimen at a time",
            RuntimeWarning,
            stacklevel=2,
        )
        batch_size, probe = 1, False
    if forced_texts is not None and len(forced_texts) != len(prepared):
        raise ValueError(f"{len(forced_texts)} forced_texts for {len(prepared)} specimens")
    lens = _prompt_lens(prepared)
    # longest first (stable), so the largest batch memory shows at once
    order = sorted(range(len(prepared)), key=lambda i: -lens[i])
    results: list[GeneratedText | None] = [None] * len(prepared)

    def finish(chunk, batch, tokens, lead, logprobs) -> None:
        rows = _decode_rows(loaded, tokens, max_new_tokens, lead, logprobs)
        texts = []
        for i, p, row in zip(chunk, batch, rows, strict=True):
            results[i] = GeneratedText(row[0], p.input_size, *row[1:])
            texts.append(results[i])
        if on_batch is not None:
            on_batch(chunk, texts)

    loader = finisher = None
    if options.overlap:
        loader = ThreadPoolExecutor(1, thread_name_prefix="vieval-collate")
        finisher = ThreadPoolExecutor(1, thread_name_prefix="vieval-decode")
    finishing: list[Future] = []
    ahead: tuple[tuple[int, ...], Future] | None = None
    pos, warned = 0, False
    try:
        while pos < len(order):
            chunk = order[pos : pos + batch_size]
            if ahead is not None and ahead[0] == tuple(chunk):
                batch, inputs = ahead[1].result()
            else:
                batch, inputs = _load_batch(loaded, prepared, chunk)
            ahead = None
            following = order[pos + len(chunk) : pos + len(chunk) + batch_size]
            if loader is not None and following:
                ahead = (tuple(following), loader.submit(_load_batch, loaded, prepared, following))
            forced = None if forced_texts is None else [forced_texts[i] for i in chunk]
            try:
                ids = [p.specimen_id for p in batch]
                tokens, lead, logprobs = generate_tokens(
                    loaded, ids, inputs, max_new_tokens, forced, options,
                    lambda rows, batch=batch: collate(loaded, [batch[r] for r in rows]),
                )  # fmt: skip
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                batch_size = len(chunk) // 2
                del inputs, batch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if not warned and not probe:
                    warnings.warn(
                        f"out of memory at batch size {len(chunk)}; halving to {batch_size}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    warned = True
                continue
            if finisher is not None:
                finishing.append(finisher.submit(finish, chunk, batch, tokens, lead, logprobs))
                while finishing and finishing[0].done():
                    finishing.pop(0).result()  # a failure surfaces at once
            else:
                finish(chunk, batch, tokens, lead, logprobs)
            pos += len(chunk)
            if progress is not None:
                progress(len(chunk))
        for future in finishing:
            future.result()
    finally:
        for pool in (loader, finisher):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    if memo is not None:
        memo["batch_size"] = batch_size
    return results  # type: ignore[return-value]
