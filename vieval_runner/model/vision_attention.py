"""Qwen-VL vision towers: one attention call per group of equal-length images, not per image.

The Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers pack every image of a batch into one
sequence and, outside flash-attention, run SDPA once per image (per window, in Qwen2.5-VL's
windowed layers) in a Python loop, after reading the boundaries back to the host in every
layer. A batch of 256 images through a 32-layer tower is 8,192 small SDPA calls (Qwen2.5-VL:
~100,000 window calls); on a GPU the launches, not the arithmetic, set the pace.

Attention never crosses an image (window), so images of the same length can go through SDPA
as one batch: ``(1, heads, n*L, d)`` viewed as ``(n, heads, L, d)``, no copy. This module
registers that as a transformers attention function (``PACKED_SDPA``) for the vision config
only, and a forward pre-hook on each vision attention module hands it the boundaries
(computed once per tower call, not per layer) while the module itself sees one chunk, so its
own projection and rotary code run unchanged. Each image's rows are computed by the same SDPA
kernel on the same values as in HF's loop (tests: bit-identical tensors and identical texts on
the CPU; on CUDA a kernel may tile a batch differently, so bf16 is checked to tolerance).
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("vieval")

PACKED_SDPA = "vieval_packed_sdpa"
_FAMILIES = {
    "Qwen2VLVisionAttention",
    "VisionAttention",
    "Qwen2_5_VLVisionAttention",
    "Qwen3VLVisionAttention",
}  # fmt: skip  (classes with the per-chunk loop)


def _groups(cu_seqlens: torch.Tensor) -> list[tuple[int, int, torch.Tensor | None]]:
    """``(length, count, token index or None)`` per distinct chunk length; None: the whole
    sequence is ``count`` chunks of ``length`` in order (no gather needed)."""
    bounds = cu_seqlens.tolist()  # one host read per tower call (HF's loop: one per layer)
    starts = bounds[:-1]
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    if len(set(lengths)) <= 1:
        return [(lengths[0] if lengths else 0, len(lengths), None)]
    groups = []
    for length in sorted(set(lengths)):
        if length == 0:
            continue
        first = torch.tensor([s for s, n in zip(starts, lengths, strict=True) if n == length])
        index = (first[:, None] + torch.arange(length)).flatten()
        groups.append((length, len(first), index.to(cu_seqlens.device)))
    return groups


def packed_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                is_causal=False, **kwargs):  # fmt: skip
    """SDPA over ``(1, heads, tokens, head_dim)`` packed images, batched by equal length,
    with the boundaries the pre-hook left on ``module``; returns ``(1, tokens, heads,
    head_dim)`` as transformers' SDPA function does."""
    groups = module.__dict__.pop("_vieval_groups", None)
    if groups is None or attention_mask is not None:
        raise RuntimeError(f"{PACKED_SDPA}: called without image boundaries (not a vision tower)")
    heads, tokens, dim = query.shape[1:]
    out = None
    for length, count, index in groups:
        parts = []
        for tensor in (query[0], key[0], value[0]):  # (heads, tokens, dim)
            if index is not None:
                tensor = tensor.index_select(1, index)
            parts.append(tensor.unflatten(1, (count, length)).transpose(0, 1))
        attended = F.scaled_dot_product_attention(*parts, dropout_p=dropout, scale=scaling)
        attended = attended.transpose(1, 2).reshape(count * length, heads, dim)
        if index is None:
            return attended.unsqueeze(0), None
        if out is None:
            out = query.new_empty(tokens, heads, dim)
        out.index_copy_(0, index, attended)
    return out.unsqueeze(0), None


def _hand_over_bounds(module, args, kwargs):
    """Forward pre-hook: leave the image boundaries for ``packed_sdpa`` and show the module
    one chunk (a host tensor: its ``tolist`` then costs no device sync)."""
    if module.config._attn_implementation != PACKED_SDPA:
        return None  # switched back to HF's own attention
    args = list(args)
    hidden = args[0] if args else kwargs["hidden_states"]
    cu_seqlens = args[1] if len(args) > 1 else kwargs["cu_seqlens"]
    groups = getattr(cu_seqlens, "_vieval_groups", None)
    if groups is None:  # the tower passes the same tensor to every layer: compute once
        groups = cu_seqlens._vieval_groups = _groups(cu_seqlens)
    module._vieval_groups = groups
    whole = torch.tensor([0, hidden.shape[0]], dtype=cu_seqlens.dtype)
    if len(args) > 1:
        args[1] = whole
    else:
        kwargs["cu_seqlens"] = whole
    return tuple(args), kwargs


def pack_vision_attention(model) -> bool:
    """Switch a Qwen-VL vision tower under SDPA to ``packed_sdpa`` (True when done).

    Other families and attention implementations are left as they are."""
    from transformers import AttentionInterface

    modules = [
        m
        for m in model.modules()
        if type(m).__name__ in _FAMILIES
        and "cu_seqlens" in inspect.signature(type(m).forward).parameters
    ]
    configs = {id(m.config): m.config for m in modules if hasattr(m, "config")}
    if not modules or len(configs) != 1:
        return False
    config = next(iter(configs.values()))
    if config._attn_implementation not in ("sdpa", PACKED_SDPA):
        return False
    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    for module in modules:
        if not getattr(module, "_vieval_packed", False):
            module.register_forward_pre_hook(_hand_over_bounds, with_kwargs=True)
            module._vieval_packed = True
    config._attn_implementation = PACKED_SDPA
    log.debug("vision attention: one SDPA call per image length (%d layers)", len(modules))
    return True


def unpack_vision_attention(model) -> None:
    """Back to transformers' own per-image loop (benchmarks compare the two)."""
    for module in model.modules():
        if getattr(module, "_vieval_packed", False):
            module.config._attn_implementation = "sdpa"
