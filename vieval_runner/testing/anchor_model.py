"""A Qwen2-VL-2B-shaped run with random weights, for throughput benchmarks on a GPU.

The real architecture and sizes of Qwen2-VL-2B (``Qwen2VLForConditionalGeneration``, 2.2 B
parameters, ~4.4 GB in bf16) built from a config, so no hub download is needed. The
tokenizer is the tiny byte-level BPE of ``tiny_models``, padded with synthetic tokens up to
the model's vocabulary so that every generated id decodes to a distinct word (random
weights pick ids all over the 151,936-token vocabulary). The processor resizes every image
to 448 x 448 (256 visual tokens). End tokens are suppressed in the saved generation config,
so every generation runs exactly ``max_new_tokens`` steps whichever way it is called.

``shrink=True`` builds the same thing with tiny dimensions (CPU dry runs of the benchmark).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vieval_runner.testing import tiny_models as tm
from vieval_runner.testing.tiny_run import trainer_state

ANCHOR_IMAGE_PX = 448  # 448 / 14 = 32 patches a side, merged 2 x 2 -> 256 visual tokens

# Qwen/Qwen2-VL-2B-Instruct config.json (the v5 nested form)
_TEXT_2B = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "mrope_section": [16, 24, 24],  # sums to head_dim / 2 = 128 / 2
    },
}
_VISION_2B = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 1536,  # the merger's output = the text hidden size
    "num_heads": 16,
    "mlp_ratio": 4,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
# same structure, tiny: CPU dry runs exercise every line of the GPU path
_TEXT_SHRUNK = {
    **_TEXT_2B,
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "mrope_section": [2, 3, 3],
    },
}
_VISION_SHRUNK = {**_VISION_2B, "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2}


_PROMPT_WORDS = ("system", "user", "assistant", "You", " helpful", " assistant", "Find", "the")


@dataclass
class AnchorRun:
    """A written anchor run: base folder, Trainer-layout run folder and its steps."""

    base_model_dir: Path
    run_dir: Path
    steps: tuple[int, ...]
    family: str
    n_parameters: int
    checkpoint_bytes: int  # size of one checkpoint's weight files
    build_s: float
    save_s: float


def anchor_tokenizer(vocab_size: int):
    """The tiny Qwen tokenizer, its BPE vocabulary padded with ``" t<id>"`` words to ``vocab_size``.

    Encoding is unchanged (no merges produce the padding words); decoding any id below
    ``vocab_size`` gives text, so outputs of random weights compare token for token.
    """
    from tokenizers import Tokenizer

    base = tm.qwen_tokenizer()
    # whole words of the chat template, so prompts are ~30 tokens as with the real tokenizer
    base.add_tokens(list(_PROMPT_WORDS))
    tree = json.loads(base.backend_tokenizer.to_str())
    vocab = tree["model"]["vocab"]
    # added words outside the BPE vocabulary take the last ids, the padding words the gap
    extra = [t for t in tree["added_tokens"] if t["content"] not in vocab]
    first_extra = vocab_size - len(extra)
    start = max(vocab.values()) + 1
    if start > first_extra:
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {start + len(extra)}")
    for i in range(start, first_extra):
        vocab[f"\u0120t{i}"] = i  # \u0120 is byte-level BPE's space
    for k, token in enumerate(extra):
        token["id"] = first_extra + k
    base._tokenizer = Tokenizer.from_str(json.dumps(tree))
    if len(base) != vocab_size:  # every model id must decode, and no token may exceed the model
        raise RuntimeError(f"anchor tokenizer has {len(base)} tokens, expected {vocab_size}")
    return base


def anchor_processor(vocab_size: int, image_px: int = ANCHOR_IMAGE_PX):
    """Qwen2-VL processor resizing every image to ``image_px`` squared (min = max pixels)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = image_px * image_px
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    video = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2VLProcessor(
        image_processor, anchor_tokenizer(vocab_size), video, chat_template=tm.QWEN_CHAT_TEMPLATE
    )


def anchor_config(processor, shrink: bool = False):
    """The ``Qwen2VLConfig`` (2B dims, or tiny ones with ``shrink``) wired to ``processor``'s ids."""
    from transformers import Qwen2VLConfig

    tok = processor.tokenizer
    text = dict(_TEXT_SHRUNK if shrink else _TEXT_2B)
    text["rope_parameters"] = dict(text["rope_parameters"])
    text.update(
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    vision = dict(_VISION_SHRUNK if shrink else _VISION_2B)
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=True,  # as Qwen2-VL-2B
        **tm.qwen_token_ids(tok),
    )


def _end_ids(tok) -> list[int]:
    return sorted({int(tok.eos_token_id), int(tok.pad_token_id)})


def build_anchor_model(processor, device: str, dtype: torch.dtype, shrink: bool, seed: int):
    """Random-weight model built directly on ``device`` in ``dtype`` (no host copy, no load)."""
    from transformers import AutoModelForImageTextToText

    config = anchor_config(processor, shrink)
    torch.manual_seed(seed)
    with torch.device(device):  # weights are created and initialised on the device itself
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    model.eval()
    gen = model.generation_config
    ends = _end_ids(processor.tokenizer)
    gen.eos_token_id = ends
    gen.pad_token_id = processor.tokenizer.pad_token_id
    gen.bos_token_id = processor.tokenizer.pad_token_id
    gen.do_sample = False
    # random weights would stop at an end token by chance in some rows: suppressing them makes
    # every generation (per-sample, batched, vieval) run exactly max_new_tokens steps
    gen.suppress_tokens = ends
    return model


def _perturb(model, seed: int, index: int, with_vision: bool, scale: float = 2e-3) -> None:
    """Add small seeded noise to the language model (and the vision tower if ``with_vision``)."""
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            if not with_vision and ".visual." in f".{name}":
                continue
            gen = torch.Generator(device=param.device).manual_seed(seed * 7919 + index * 1009 + i)
            noise = torch.randn(param.shape, generator=gen, device=param.device, dtype=param.dtype)
            param.add_(noise, alpha=scale)


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def write_anchor_run(
    out_dir: str | Path,
    checkpoints: int = 3,
    freeze_vision_in: tuple[int, ...] = (1, 2),
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    *,
    shrink: bool = False,
    seed: int = 0,
    step_every: int = 100,
) -> AnchorRun:
    """Write ``out_dir/base`` and ``out_dir/run/checkpoint-<step>/`` (Trainer layout).

    Checkpoint ``i`` (0-based) perturbs the previous weights; for ``i`` in ``freeze_vision_in``
    the vision tower is kept bit-identical to the previous checkpoint's (a frozen tower, as in
    most fine-tunes) and only the language model changes.
    """
    out_dir = Path(out_dir)
    steps = tuple(step_every * (i + 1) for i in range(checkpoints))
    t0 = time.perf_counter()
    processor = anchor_processor(_TEXT_SHRUNK["vocab_size"] if shrink else _TEXT_2B["vocab_size"])
    model = build_anchor_model(processor, device, dtype, shrink, seed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = out_dir / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    for i, step in enumerate(steps):
        _perturb(model, seed, i + 1, with_vision=i not in freeze_vision_in)
        ckpt = out_dir / "run" / f"checkpoint-{step}"
        model.save_pretrained(ckpt)
        processor.save_pretrained(ckpt)
        state = trainer_state(step, steps, seed)
        (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    save_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return AnchorRun(
        base_model_dir=base,
        run_dir=out_dir / "run",
        steps=steps,
        family="qwen2_vl",
        n_parameters=n_params,
        checkpoint_bytes=_weights_bytes(base),
        build_s=build_s,
        save_s=save_s,
    )


def format_params(n_parameters: int) -> str:
    """Human-readable parameter count (``2.21 B``)."""
    return f"{n_parameters / 1e9:.2f} B" if n_parameters >= 1e8 else f"{n_parameters / 1e6:.2f} M"


__all__ = [
    "ANCHOR_IMAGE_PX",
    "AnchorRun",
    "anchor_config",
    "anchor_processor",
    "anchor_tokenizer",
    "build_anchor_model",
    "format_params",
    "write_anchor_run",
]
