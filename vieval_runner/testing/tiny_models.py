"""The project's one factory of tiny, offline vision-language models (tests, demo, GPU check).

Each family is the REAL transformers class with its own image processor and Processor, shrunk
to ~0.1-0.5 M parameters, with a tiny byte-level BPE tokenizer trained here on a built-in
corpus. Nothing is downloaded. To add a family, write one ``_build_<family>`` function (or a
module in ``tiny_families/``) and register it in ``_BUILDERS``. ``write_tiny_lora_run``
(``tiny_families/lora.py``) writes LoRA adapter runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor

from vieval_runner.testing.tiny_families import BUILDERS as _MORE_BUILDERS
from vieval_runner.testing.tiny_families.lora import write_tiny_lora_run  # noqa: F401  (public: LoRA runs)

FAMILIES_BUILDABLE: tuple[str, ...] = (
    "qwen2_vl",
    "qwen25_vl",
    "qwen3_vl",
    "paligemma",
    "florence2",
    "internvl",
    "llava",
    "smolvlm",
)

_WORDS = (
    "red blue green yellow black white orange purple gray pink "
    "triangle circle square rectangle star box shape object dog cat person car tree "
    "left right top bottom middle center above below next to near far small large big "
    "the a an of in on at and or is are what where which how many color there image picture "
    "find locate detect answer en output its bbox coordinates JSON format label yes no "
    "Locate Find Detect What Where Which How Is Are The A"
)
_CORPUS: tuple[str, ...] = (
    _WORDS,
    "0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 25 32 48 50 64 75 99 100 128 200 256 300 400 500 "
    "512 600 700 750 768 800 900 999 1000 1023 1024",
    '[{"bbox_2d": [12, 34, 56, 78], "label": "red circle"}]',
    '```json\n[\n  {"bbox_2d": [100, 200, 300, 400], "label": "blue square"}\n]\n```',
    "(100,200),(300,400) (0,0),(999,999) [1, 2, 3, 4] {} [] : ; , . ! ? ' \" - _ / \\ < > = + * # %",
    "Locate the red triangle in the image and output its bbox coordinates in JSON format.",
    "What color is the circle on the left? The circle is blue. How many squares are there? 3",
    "detect red circle ; blue square ; green triangle",
    "answer en what shape is at the top right of the picture",
)

_QWEN_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The real Qwen2-VL template, trimmed to what evaluation uses (system, images, text, turns).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyRun:
    """A written tiny training run: base model dir, Trainer-layout run dir and its steps."""

    base_model_dir: Path
    run_dir: Path
    steps: tuple[int, ...]
    family: str


def _train_tokenizer(specials: tuple[str, ...], vocab_size: int = 420):
    """A byte-level BPE trained on the built-in corpus; specials get the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return tok


def _qwen_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(_QWEN_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(_QWEN_SPECIALS[1:]),
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _qwen_processor(family: str, patch_size: int):
    """Processor with small pixel budgets: 64-128 px images give 4-36 visual tokens."""
    from transformers import Qwen2VLImageProcessor

    factor = patch_size * 2  # patch x merge_size
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": factor * factor * 2, "longest_edge": factor * factor * 16},
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
    )
    tokenizer = _qwen_tokenizer()
    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
        return Qwen3VLProcessor(image_processor, tokenizer, video, chat_template=QWEN_CHAT_TEMPLATE)
    from transformers import Qwen2VLVideoProcessor

    video = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    if family == "qwen25_vl":
        from transformers import Qwen2_5_VLProcessor as cls
    else:
        from transformers import Qwen2VLProcessor as cls
    return cls(image_processor, tokenizer, video, chat_template=QWEN_CHAT_TEMPLATE)


def _qwen_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen_text_config(tokenizer, **extra) -> dict:
    # head_dim 16 -> mrope_section must sum to 8
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
        },
        **extra,
    }


def _build_qwen2_vl(processor):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = processor.tokenizer
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    config = Qwen2VLConfig(text_config=_qwen_text_config(tok), vision_config=vision,
                           **_qwen_token_ids(tok))  # fmt: skip
    return Qwen2VLForConditionalGeneration(config)


def _build_qwen25_vl(processor):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = processor.tokenizer
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
              "out_hidden_size": 32, "window_size": 56, "fullatt_block_indexes": [1],
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=_qwen_text_config(tok), vision_config=vision,
                              **_qwen_token_ids(tok))  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config)


def _build_qwen3_vl(processor):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = processor.tokenizer
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
              "out_hidden_size": 32, "num_position_embeddings": 64,
              "deepstack_visual_indexes": [0], "patch_size": 16, "spatial_merge_size": 2,
              "temporal_patch_size": 2}  # fmt: skip
    text = _qwen_text_config(tok, head_dim=16)
    text["rope_parameters"]["mrope_interleaved"] = True
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tok))
    return Qwen3VLForConditionalGeneration(config)


# family -> (processor factory, model factory taking the processor)
_BUILDERS: dict[str, tuple[Callable, Callable]] = {
    "qwen2_vl": (lambda: _qwen_processor("qwen2_vl", 14), _build_qwen2_vl),
    "qwen25_vl": (lambda: _qwen_processor("qwen25_vl", 14), _build_qwen25_vl),
    "qwen3_vl": (lambda: _qwen_processor("qwen3_vl", 16), _build_qwen3_vl),
    **_MORE_BUILDERS,  # PaliGemma, Florence-2, InternVL, LLaVA, SmolVLM: tiny_families/
}


def _end_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id]
    if "<|endoftext|>" in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return ids


def build_tiny_model(family: str, seed: int = 0):
    """Build ``(model, processor)`` for ``family``: real classes, tiny sizes, random weights."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; buildable: {', '.join(_BUILDERS)}")
    make_processor, make_model = _BUILDERS[family]
    processor = make_processor()  # first: some processors grow the tokenizer
    torch.manual_seed(seed)
    model = make_model(processor).eval()
    tok = processor.tokenizer
    gen = model.generation_config
    gen.eos_token_id = _end_token_ids(tok)
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id
    gen.do_sample = False
    return model, processor


def _perturb(model, seed: int, step: int) -> None:
    """Deterministic per-step weight change, large enough that greedy outputs differ."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            param.add_(noise * (0.02 * math.sqrt(step / 100)))


def _trainer_state(step: int, steps: tuple[int, ...], seed: int) -> dict:
    """A Trainer ``trainer_state.json`` as transformers writes it (loss every 10 steps)."""
    gen = torch.Generator().manual_seed(seed + step)
    history: list[dict] = []
    for s in range(10, step + 1, 10):
        loss = 2.5 * math.exp(-s / 400) + 0.05 * float(torch.rand(1, generator=gen))
        history.append({"epoch": round(s / 200, 4), "grad_norm": round(1.5 * math.exp(-s / 500), 4),
                        "learning_rate": 2e-5 * (1 - s / (max(steps) + 1)),
                        "loss": round(loss, 4), "step": s})  # fmt: skip
        if s in steps:
            history.append({"epoch": round(s / 200, 4), "eval_loss": round(loss * 1.1, 4),
                            "eval_runtime": 1.23, "eval_samples_per_second": 52.0,
                            "eval_steps_per_second": 6.5, "step": s})  # fmt: skip
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": round(step / 200, 4),
        "eval_steps": steps[0],
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": history,
        "logging_steps": 10,
        "max_steps": max(steps),
        "num_input_tokens_seen": 0,
        "num_train_epochs": math.ceil(max(steps) / 200),
        "save_steps": steps[0],
        "stateful_callbacks": {"TrainerControl": {"args": {
            "should_epoch_stop": False, "should_evaluate": False, "should_log": False,
            "should_save": True, "should_training_stop": step == max(steps)}, "attributes": {}}},
        "total_flos": 0.0,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }  # fmt: skip


def write_base(out_dir: Path, family: str, seed: int):
    """Build the tiny ``family`` model and save it with its processor at ``out_dir/base``
    (step 0 of a run); returns ``(model, processor, base_dir)``."""
    model, processor = build_tiny_model(family, seed)
    base = Path(out_dir) / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    return model, processor, base


def write_tiny_run(
    out_dir: str | Path, family: str, steps: tuple[int, ...] = (100, 200, 300), seed: int = 0
) -> TinyRun:
    """Write ``out_dir/base`` and a Trainer-layout ``out_dir/run/checkpoint-<step>/`` per step."""
    out_dir = Path(out_dir)
    steps = tuple(sorted(int(s) for s in steps))
    model, processor, base = write_base(out_dir, family, seed)
    run_dir = out_dir / "run"
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for step in steps:
        model.load_state_dict(base_state)
        _perturb(model, seed, step)
        ckpt = run_dir / f"checkpoint-{step}"
        model.save_pretrained(ckpt)
        processor.save_pretrained(ckpt)
        state = _trainer_state(step, steps, seed)
        (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    return TinyRun(base_model_dir=base, run_dir=run_dir, steps=steps, family=family)


class SoftScript(str):
    """A scripted answer whose tokens are boosted rather than forced (tests of scores).

    ``margins[t]`` (aligned with the text's tokens, then EOS): the scripted token ``t`` gets
    the row's best score plus this margin, so greedy decoding still writes the script but the
    token's probability is below 1 and depends on the margin; ``None`` (or past the list)
    forces it as usual. It is a ``str``, so it travels through ``forced_texts`` unchanged.
    """

    margins: tuple[float | None, ...]

    def __new__(cls, text: str, margins: Sequence[float | None]) -> SoftScript:
        obj = super().__new__(cls, text)
        obj.margins = tuple(margins)
        return obj


class ForcedTextLogitsProcessor(LogitsProcessor):
    """Forces batch row ``i`` to emit the tokens of ``texts[i]`` then EOS (None: leave free).

    Used by tests and the demo to push scripted answers through the real ``generate`` and
    decode path. ``texts`` is aligned with the rows of the batch as passed to ``generate``;
    ``generation.generate(forced_texts=...)`` keeps it aligned across its length sort.
    One instance serves one ``generate`` call (it remembers the prompt length). A
    ``SoftScript`` text is boosted by its margins instead of forced (see there).
    """

    def __init__(self, tokenizer, texts: list[str | None], eos_token_id: int | None = None):
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        self.targets = [
            None if t is None else tokenizer.encode(t, add_special_tokens=False) + [eos]
            for t in texts
        ]
        self.margins = [getattr(t, "margins", ()) for t in texts]
        self.eos = eos
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        t = input_ids.shape[1] - self.prompt_len
        if len(self.targets) != scores.shape[0]:
            raise ValueError(f"{len(self.targets)} forced texts for a batch of {scores.shape[0]}")
        scores = scores.clone()
        for row, target in enumerate(self.targets):
            if target is None:
                continue
            token = target[t] if t < len(target) else self.eos
            margins = self.margins[row]
            margin = margins[t] if t < len(margins) else None
            if margin is not None:
                scores[row, token] = scores[row].max() + float(margin)
                continue
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores
