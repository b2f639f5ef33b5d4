"""The lean greedy loop: HF ``generate``'s plain greedy decoding without its per-step
bookkeeping, through the model's own generation hooks (see ``decoding`` for when it is used
and how it is checked against HF ``generate``)."""

from __future__ import annotations

import copy
import functools
import inspect
from typing import TYPE_CHECKING

import torch

from vieval_runner.families import FAMILIES
from vieval_runner.generate.step_graph import StepGraph
from vieval_runner.records import LoadedModel

if TYPE_CHECKING:
    from vieval_runner.generate.options import GenerateOptions

# generation-config fields the lean loop cannot honour: they change the decoding algorithm
# (candidates, classifier-free guidance, stop strings, time limits), not one step's scores.
# Score-level settings (repetition_penalty, suppress_tokens, no_repeat_ngram_size, min
# lengths, bad words, ...) come from HF's own processor list for the installed version.
_ALGORITHM_FIELDS = {
    "num_beam_groups", "penalty_alpha", "guidance_scale", "stop_strings",
    "max_time", "prompt_lookup_num_tokens", "assistant_early_exit", "num_assistant_tokens",
    "assistant_confidence_threshold", "prefill_chunk_size", "dola_layers", "token_healing",
    "cache_implementation", "compile_config", "watermarking_config",
}  # fmt: skip


def pad_id(loaded: LoadedModel) -> int:
    tokenizer = loaded.processor.tokenizer
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(end_ids(loaded)[0])


def end_ids(loaded: LoadedModel) -> list[int]:
    """Token ids that end a generation: eos (all of them), pad and end-of-turn."""
    gen = loaded.model.generation_config
    eos = gen.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    tokenizer = loaded.processor.tokenizer
    for token_id in (tokenizer.eos_token_id, tokenizer.pad_token_id, gen.pad_token_id):
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


def lean_blocker(loaded: LoadedModel, options: GenerateOptions) -> str | None:
    """Why the lean loop cannot be exact for this model and these options (None: it can)."""
    model = loaded.model
    if not options.lean:
        return "lean: false"
    if FAMILIES[loaded.family]["encoder_decoder"]:
        return "encoder-decoder model"
    if options.compile:
        return "compile (HF generate compiles the step)"
    for hook in ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation"):
        if not hasattr(model, hook):
            return f"this transformers version has no {hook}"
    for hook in ("_get_logits_processor", "_prepare_special_tokens"):
        if not hasattr(model, hook):
            return f"this transformers version has no {hook}"
    diff = model.generation_config.to_diff_dict()
    blocking = sorted(k for k in set(diff) & _ALGORITHM_FIELDS if diff[k] not in (None, 1, False))
    if blocking:
        return "generation config sets " + ", ".join(blocking)
    return None


def _hf_processors(model, input_ids, kwargs, max_new_tokens: int, pad: int, ends: list[int]):
    """The logits processors HF ``generate`` builds for this config and batch (greedy: no
    warpers), from the installed version's own builder: its semantics, whatever they are."""

    from transformers import LogitsProcessorList

    gen = copy.deepcopy(model.generation_config)
    gen.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
               eos_token_id=ends, forced_eos_token_id=None)  # fmt: skip
    gen.max_length = max_new_tokens + input_ids.shape[1]  # as _prepare_generated_length
    model._prepare_special_tokens(gen, True, device=input_ids.device, batch_size=len(input_ids))
    return model._get_logits_processor(
        generation_config=gen,
        input_ids_seq_length=input_ids.shape[1],
        encoder_input_ids=input_ids,
        logits_processor=LogitsProcessorList(),
        device=input_ids.device,
        model_kwargs=kwargs,  # the attention mask as generate has it (None: no padding)
    )


def _greedy_scores(scores: torch.Tensor, input_ids: torch.Tensor, processors: list) -> torch.Tensor:
    """Next-token scores after HF's processors for the config, then the caller's."""
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def lean_greedy(
    loaded: LoadedModel,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    processors: list,
    scores: bool,
    static_cache: bool = False,
    graphs: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy decoding of one batch: new tokens (rows that ended are padded, as HF pads them)
    and, with ``scores``, each token's log-probability under the processed scores.

    ``static_cache``: a static KV cache sized as HF ``generate`` sizes it. ``graphs`` (static
    cache only): ``"cuda"`` replays the decoding steps from a CUDA graph captured after the
    first one (``step_graph``), ``"call"`` runs the same buffer logic without a graph (tests)."""
    model = loaded.model
    kwargs = dict(inputs)
    input_ids = kwargs.pop("input_ids")
    rows = input_ids.shape[0]
    device = input_ids.device
    kwargs["use_cache"] = True
    if hasattr(model, "_prepare_position_ids_for_generation") and _takes(model, "position_ids"):
        kwargs["position_ids"] = model._prepare_position_ids_for_generation(input_ids, kwargs)
    if (mask := kwargs.get("attention_mask")) is not None and bool((mask == 1).all()):
        kwargs["attention_mask"] = None  # as generate(): no padding, so no mask to build
    if _takes(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    processors = [
        *_hf_processors(model, input_ids, kwargs, max_new_tokens, pad_id(loaded), end_ids(loaded)),
        *processors,
    ]
    ends = torch.tensor(end_ids(loaded), device=device)
    pad = torch.tensor(pad_id(loaded), device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    # a host sync per step would stall a GPU that runs ahead of Python; check every few steps
    check_every = 1 if device.type == "cpu" else 4
    prompt_len = input_ids.shape[1]
    decode_mask = step_mask_buffer(model, kwargs.get("attention_mask"), max_new_tokens)
    if static_cache:  # prepare_inputs_for_generation then builds the static-length masks
        kwargs[cache_argument()] = static_kv_cache(model, prompt_len + max_new_tokens - 1)
        decode_mask = None
    step_graph = None
    logprobs: list[torch.Tensor] = []
    first = True
    while True:
        model_inputs = model.prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=None if first else 1,
            is_first_iteration=first,
            **kwargs,
        )
        if decode_mask is not None and not first:
            # the 4-D mask HF would build from the 2-D one this step (passed through as-is)
            model_inputs["attention_mask"] = decode_mask[..., : input_ids.shape[1]].contiguous()
        if graphs is not None and not first:
            _slice_per_token_inputs(model_inputs)
        if first or graphs is None:
            outputs = model(**model_inputs, return_dict=True)
        elif step_graph is None:  # the first decoding step runs eagerly, then is captured
            # (eagerly on this stream, as the prefill ran: the kernels and cuBLAS are warm)
            outputs = model(**model_inputs, return_dict=True)
            if max_new_tokens - (input_ids.shape[1] - prompt_len) - 1 >= 2:  # replays to come
                step_graph = StepGraph(model, model_inputs, replay_by_call=graphs == "call")
        elif step_graph.accepts(model_inputs):
            outputs = step_graph.run(model_inputs)
        else:  # not expected: a step whose inputs changed shape or kind
            outputs = model(**model_inputs, return_dict=True)
        kwargs = model._update_model_kwargs_for_generation(outputs, kwargs)
        first = False
        step_scores = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        del outputs
        step_scores = _greedy_scores(step_scores, input_ids, processors)
        chosen = step_scores.argmax(-1)
        chosen = torch.where(unfinished, chosen, pad)
        if scores:
            logprobs.append(step_scores.log_softmax(-1).gather(1, chosen[:, None]))
        input_ids = torch.cat([input_ids, chosen[:, None]], dim=-1)
        unfinished &= ~torch.isin(chosen, ends)
        produced = input_ids.shape[1] - prompt_len
        if produced >= max_new_tokens:
            break
        if produced % check_every == 0 and not bool(unfinished.any()):
            break
    new = input_ids[:, prompt_len:]
    return new, (torch.cat(logprobs, dim=1) if scores else None)


# inputs with one value per token, which a decoding step takes for its one token only
_PER_TOKEN = ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")


def _slice_per_token_inputs(model_inputs: dict) -> None:
    """Per-token inputs cut to the step's token, as ``prepare_inputs_for_generation`` means to
    (transformers 5.17 lists ``mm_token_type_ids`` for slicing but passes it whole, so it grows
    every step: a captured graph needs fixed shapes; the forward reads it only for prefill)."""
    ids = model_inputs.get("input_ids")
    if not torch.is_tensor(ids):
        return
    for name in _PER_TOKEN:
        value = model_inputs.get(name)
        if torch.is_tensor(value) and value.shape[-1] != ids.shape[-1]:
            model_inputs[name] = value[..., -ids.shape[-1] :].contiguous()


@functools.cache
def cache_argument() -> str:
    """The name generate's model hooks give the KV cache in this transformers version."""
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def static_kv_cache(model, max_cache_len: int):
    """An empty static KV cache for the model's decoder (filled lazily by the prefill)."""
    from transformers import StaticCache

    return StaticCache(
        config=model.config.get_text_config(decoder=True), max_cache_len=max_cache_len
    )


def full_attention_only(model) -> bool:
    """SDPA, causal and full attention in every layer: no sliding or chunked layers (their
    masks cut positions, and static sliding layers keep a Python-side counter a graph would
    not advance)."""
    text = model.config.get_text_config()
    if getattr(text, "_attn_implementation", None) != "sdpa" or not getattr(
        text, "is_causal", True
    ):
        return False
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        return False
    if getattr(text, "attention_chunk_size", None):
        return False
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    return not (sliding and not layer_types)  # a sliding window without per-layer types


def step_mask_buffer(
    model, attention_mask: torch.Tensor | None, max_new_tokens: int
) -> torch.Tensor | None:
    """The SDPA masks of every decoding step, as one ``(batch, 1, 1, prompt + new)`` bool
    buffer, or None where HF's own mask building must stay.

    A one-token step under SDPA attends to every earlier position that is not padding, so
    HF's ``create_causal_mask`` returns the 2-D mask as a 4-D bool tensor whenever the batch
    has padding (it rebuilds it every step, and on a GPU reads it back to the host to check
    for padding). A 4-D mask is passed through as-is (``_preprocess_mask_arguments``), so a
    slice of this buffer gives the model the same mask without that work. Applies only where
    the mask cannot be anything else: padding present (without it HF may skip the mask),
    SDPA, causal, and full attention in every layer (sliding or chunked layers cut positions).
    """
    if attention_mask is None or attention_mask.ndim != 2 or bool(attention_mask.all()):
        return None
    if not full_attention_only(model):
        return None
    rows, prompt_len = attention_mask.shape
    mask = torch.ones(
        rows, 1, 1, prompt_len + max_new_tokens, dtype=torch.bool, device=attention_mask.device
    )
    mask[:, 0, 0, :prompt_len] = attention_mask.bool()
    return mask


_FORWARD_PARAMS: dict[type, set[str]] = {}


def _takes(model, name: str) -> bool:
    """Whether the model's ``forward`` has this parameter (as generate() checks)."""
    params = _FORWARD_PARAMS.get(type(model))
    if params is None:
        params = _FORWARD_PARAMS[type(model)] = set(inspect.signature(model.forward).parameters)
    return name in params
