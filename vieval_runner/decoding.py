"""One batch of greedy decoding: HF ``generate``, or a lean loop over the same model hooks.

HF ``generate`` spends ~25-30 % of a small model's decoding time outside the model's forward
(config merging and validation, logits-processor and stopping-criteria objects, output
bookkeeping). The lean loop does what ``_sample`` does for plain greedy decoding, through the
model's own generation hooks (``_prepare_position_ids_for_generation``,
``prepare_inputs_for_generation``, ``_update_model_kwargs_for_generation``), so per-family
details (Qwen's 3-D rope positions, PaliGemma's token types, pixels only at prefill) stay the
model's, and the scores go through the logits processors HF's own builder makes for the
config (``repetition_penalty``, ``suppress_tokens``, ...). It applies where it can be exact:
decoder-only families, no static cache or compile, and no generation-config setting that
changes the decoding algorithm itself (``lean_blocker`` names what stops it). The first batch of each loaded model
(and generation config) is also decoded both ways on two of its rows (the longest and the
shortest prompt), up to 8 new tokens; any difference (another transformers version, say)
switches the lean loop off for that model with a warning.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .models import FAMILIES, LoadedModel

log = logging.getLogger("vieval")

# fast tokenizers raise "Already borrowed" when used from two threads at once
TOKENIZER_LOCK = threading.Lock()

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
_VERIFY_TOKENS = 8  # the first-batch check's budget: a drift shows in the first tokens


@dataclass
class GenerateOptions:
    """How ``generate`` runs (everything but the inputs); defaults = plain greedy decoding."""

    static_cache: bool = False  # cache_implementation="static" (no torch.compile)
    compile: bool = False  # static cache + torch.compile of the decoding forward
    vision_cache: object = None  # embedding_cache.VisionCache: image embeddings by specimen
    overlap: bool = True  # collate ahead and decode behind on helper threads
    scores: bool = False  # token log-probabilities -> GeneratedText.confidence (box scores)
    lean: bool = True  # the lean greedy loop where it is exact (else HF generate)


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


def to_device(loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    moved = {}
    for key, value in inputs.items():
        value = value.to(loaded.device)
        if value.is_floating_point():  # pixel values follow the model's dtype
            value = value.to(loaded.dtype)
        moved[key] = value
    return moved


def lean_blocker(loaded: LoadedModel, options: GenerateOptions) -> str | None:
    """Why the lean loop cannot be exact for this model and these options (None: it can)."""
    model = loaded.model
    if not options.lean:
        return "lean: false"
    if FAMILIES[loaded.family]["encoder_decoder"]:
        return "encoder-decoder model"
    if options.static_cache or options.compile:
        return "static cache / compile"
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
    import copy

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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy decoding of one batch: new tokens (rows that ended are padded, as HF pads them)
    and, with ``scores``, each token's log-probability under the processed scores."""
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
    text = model.config.get_text_config()
    if getattr(text, "_attn_implementation", None) != "sdpa" or not getattr(
        text, "is_causal", True
    ):
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        return None
    if getattr(text, "attention_chunk_size", None):
        return None
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    if sliding and not layer_types:  # a sliding window without per-layer types: every layer
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


def hf_generate(
    loaded: LoadedModel,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    processors: list,
    options: GenerateOptions,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF ``generate``: the full output and, with ``options.scores``, the new tokens'
    log-probabilities."""
    kwargs: dict = {}
    if processors:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList(processors)
    if options.static_cache or options.compile:
        kwargs["cache_implementation"] = "static"
        kwargs["disable_compile"] = not options.compile
        if options.compile:
            from transformers import CompileConfig

            config = CompileConfig()
            config._compile_all_devices = True  # transformers compiles only on GPUs otherwise
            kwargs["compile_config"] = config
    if options.scores:
        kwargs.update(output_scores=True, return_dict_in_generate=True)
    out = loaded.model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id(loaded),
        eos_token_id=end_ids(loaded),
        **kwargs,
    )
    if not options.scores:
        return out, None
    # one log-probability per generated token (the sequences' tail), softmax-normalized
    logprobs = loaded.model.compute_transition_scores(
        out.sequences, out.scores, normalize_logits=True
    )
    return out.sequences, logprobs


def _forced_processors(loaded: LoadedModel, forced: list[str | None] | None) -> list:
    if forced is None:
        return []
    from .tiny_models import ForcedTextLogitsProcessor

    with TOKENIZER_LOCK:
        return [ForcedTextLogitsProcessor(loaded.processor.tokenizer, forced, end_ids(loaded)[0])]


def _lean_matches(loaded, part, max_new_tokens, forced, scores: bool) -> bool:
    """Decode ``part`` (a small collated batch) both ways; True when the lean loop gives HF's
    tokens."""
    max_new_tokens = min(max_new_tokens, _VERIFY_TOKENS)
    reference, _ = hf_generate(
        loaded, part, max_new_tokens, _forced_processors(loaded, forced), GenerateOptions()
    )
    reference = reference[:, part["input_ids"].shape[1] :]
    lean, _ = lean_greedy(loaded, part, max_new_tokens, _forced_processors(loaded, forced), scores)
    n = reference.shape[1]  # HF stops when every row ended; the lean loop may pad a little more
    pads = lean[:, n:]
    return torch.equal(lean[:, :n], reference) and bool(
        torch.isin(pads, lean.new_tensor(end_ids(loaded))).all()
    )


def generate_tokens(
    loaded: LoadedModel,
    specimen_ids: list[str],
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    forced: list[str | None] | None,
    options: GenerateOptions,
    collate_rows: Callable[[list[int]], dict[str, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, int | None, torch.Tensor | None]:
    """One batch: the new tokens (on CPU), a forced lead token to drop, and the tokens'
    log-probabilities (``options.scores``; else None). ``collate_rows(rows)``: a batch of
    just those rows, for the lean loop's first-batch check (None: it checks the whole batch)."""
    inputs = to_device(loaded, inputs)
    gen_config = loaded.model.generation_config
    # A forced end token at max length (BART, Florence-2) would replace the last token and
    # hide truncation. generate() refills None arguments from the model's generation config,
    # so it is switched off there for the call.
    forced_eos, gen_config.forced_eos_token_id = gen_config.forced_eos_token_id, None
    cache = options.vision_cache
    try:
        with torch.inference_mode():
            lean = _use_lean(loaded, inputs, max_new_tokens, forced, options, collate_rows)
            scope = cache.batch(specimen_ids) if cache is not None else contextlib.nullcontext()
            processors = _forced_processors(loaded, forced)
            with scope:
                if lean:
                    tokens, logprobs = lean_greedy(
                        loaded, inputs, max_new_tokens, processors, options.scores
                    )
                else:
                    out, logprobs = hf_generate(loaded, inputs, max_new_tokens, processors, options)
                    tokens = out[:, inputs["input_ids"].shape[1] :] if not _enc_dec(loaded) else out
    finally:
        gen_config.forced_eos_token_id = forced_eos
    logprobs = None if logprobs is None else logprobs.cpu()
    if not _enc_dec(loaded):
        return tokens.cpu(), None, logprobs
    # encoder-decoder: the output holds no prompt; drop the decoder start token and the
    # forced <s> after it (Florence-2 writes "</s><s>answer</s>")
    return tokens[:, 1:].cpu(), gen_config.forced_bos_token_id, logprobs


def _enc_dec(loaded: LoadedModel) -> bool:
    return bool(FAMILIES[loaded.family]["encoder_decoder"])


def _verdict_key(loaded: LoadedModel) -> str:
    return json.dumps(loaded.model.generation_config.to_diff_dict(), sort_keys=True, default=str)


def check_lean(
    loaded: LoadedModel,
    part: dict[str, torch.Tensor],
    max_new_tokens: int,
    forced: list[str | None] | None,
    options: GenerateOptions,
) -> bool:
    """Whether the lean loop serves this model: decided once per model and generation config
    (a checkpoint may bring its own ``generation_config.json``) by decoding ``part``, a small
    batch on the model's device, both ways. The runner calls it early, on two specimens of
    the first prepared chunk while the rest of the split is prepared; else the first batch
    does (``_use_lean``)."""
    verdicts = loaded.model.__dict__.setdefault("_vieval_lean", {})
    key = _verdict_key(loaded)
    if key in verdicts:
        return verdicts[key]
    reason = lean_blocker(loaded, options)
    if reason is None:
        try:
            if not _lean_matches(loaded, part, max_new_tokens, forced, options.scores):
                reason = "it differed from HF generate on the first batch"
        except torch.OutOfMemoryError:
            raise  # the caller halves the batch
        except Exception as exc:  # e.g. a generation hook another transformers version lacks
            reason = f"it failed on the first batch ({type(exc).__name__}: {exc})"
        if reason is not None:
            log.warning("lean greedy decoding is off for %s: %s", loaded.family, reason)
    else:
        log.info("HF generate (lean greedy loop off: %s)", reason)
    if options.lean and not (options.static_cache or options.compile):
        # the verdict holds for this model whatever the batch; option-driven ones are not kept
        verdicts[key] = reason is None
    return reason is None


def _use_lean(loaded, inputs, max_new_tokens, forced, options, collate_rows) -> bool:
    """The lean loop where it is exact (``check_lean`` on this batch unless decided)."""
    verdict = loaded.model.__dict__.get("_vieval_lean", {}).get(_verdict_key(loaded))
    if verdict is not None:
        return verdict
    part, few = inputs, forced
    if collate_rows is not None and lean_blocker(loaded, options) is None:
        # the longest and the shortest prompt: the check covers left padding
        rows = sorted({0, inputs["input_ids"].shape[0] - 1})
        part = to_device(loaded, collate_rows(rows))
        few = None if forced is None else [forced[r] for r in rows]
    return check_lean(loaded, part, max_new_tokens, few, options)
