"""One batch of greedy decoding: HF ``generate``, or a lean loop over the same model hooks.

HF ``generate`` spends ~25-30 % of a small model's decoding time outside the model's forward
(config merging and validation, logits-processor and stopping-criteria objects, output
bookkeeping). The lean loop does what ``_sample`` does for plain greedy decoding, through the
model's own generation hooks (``_prepare_position_ids_for_generation``,
``prepare_inputs_for_generation``, ``_update_model_kwargs_for_generation``), so per-family
details (Qwen's 3-D rope positions, PaliGemma's token types, pixels only at prefill) stay the
model's, and the scores go through the logits processors HF's own builder makes for the
config (``repetition_penalty``, ``suppress_tokens``, ...). One-token steps of a padded batch
get their SDPA mask from one buffer (``step_mask_buffer``): the very mask HF's
``create_causal_mask`` would rebuild each step (and, on a GPU, read back to the host).
With ``static_cache`` the lean loop uses a static KV cache sized as HF sizes it, and on CUDA
replays its decoding steps from a CUDA graph (``step_graph``): the steps cost one launch each
instead of hundreds. It applies where it can be exact: decoder-only families, no compile, and
no generation-config setting that changes the decoding algorithm itself (``lean_blocker``
names what stops it). Each loaded model (generation config, cache kind) is also checked once
(``check_lean``): two specimens (the longest and the shortest prompt) are decoded both ways,
up to 8 new tokens, against HF ``generate`` with the same kind of cache; any difference
(another transformers version, say) switches the CUDA graphs, then the lean loop, off for
that model with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable

import torch

from vieval_runner.families import FAMILIES
from vieval_runner.generate.lean_loop import (
    end_ids,
    full_attention_only,
    lean_blocker,
    lean_greedy,
    pad_id,
    step_mask_buffer,
)
from vieval_runner.generate.options import GenerateOptions
from vieval_runner.records import LoadedModel

__all__ = [  # the lean loop's names stay importable from here
    "GenerateOptions", "TOKENIZER_LOCK", "check_lean", "end_ids", "generate_tokens",
    "hf_generate", "lean_blocker", "lean_greedy", "pad_id", "step_mask_buffer", "to_device",
]  # fmt: skip

log = logging.getLogger("vieval")

# fast tokenizers raise "Already borrowed" when used from two threads at once
TOKENIZER_LOCK = threading.Lock()

_VERIFY_TOKENS = 8  # the one-time check's budget: a drift shows in the first tokens


def to_device(
    loaded: LoadedModel, inputs: dict[str, torch.Tensor], keep_on_host: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The inputs on the model's device, floating-point ones in its dtype; ``keep_on_host``:
    keys left where they are (pixel values of a batch the embedding cache serves)."""
    moved = {}
    for key, value in inputs.items():
        if key in keep_on_host:
            moved[key] = value
            continue
        value = value.to(loaded.device)
        if value.is_floating_point():  # pixel values follow the model's dtype
            value = value.to(loaded.dtype)
        moved[key] = value
    return moved


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
    from vieval_runner.generate.forced import ForcedTextLogitsProcessor

    with TOKENIZER_LOCK:
        return [ForcedTextLogitsProcessor(loaded.processor.tokenizer, forced, end_ids(loaded)[0])]


def _lean_matches(loaded, part, max_new_tokens, forced, options, graphs) -> bool:
    """Decode ``part`` (a small collated batch) both ways; True when the lean loop gives HF's
    tokens (with a static cache, HF's static cache of the same length)."""
    max_new_tokens = min(max_new_tokens, _VERIFY_TOKENS)
    # HF sizes a static cache by the longest call so far (a model attribute): start afresh
    loaded.model.__dict__.pop("_previous_max_cache_length", None)
    reference, _ = hf_generate(
        loaded, part, max_new_tokens, _forced_processors(loaded, forced),
        GenerateOptions(static_cache=options.static_cache),
    )  # fmt: skip
    reference = reference[:, part["input_ids"].shape[1] :]
    lean, _ = lean_greedy(
        loaded, part, max_new_tokens, _forced_processors(loaded, forced), options.scores,
        static_cache=options.static_cache, graphs=graphs,
    )  # fmt: skip
    n = reference.shape[1]  # HF stops when every row ended; the lean loop may pad a little more
    pads = lean[:, n:]
    return torch.equal(lean[:, :n], reference) and bool(
        torch.isin(pads, lean.new_tensor(end_ids(loaded))).all()
    )


def graph_mode(loaded: LoadedModel, options: GenerateOptions) -> str | None:
    """``"cuda"`` where the lean loop may replay decoding steps from CUDA graphs: a static
    cache on a CUDA device, full attention in every layer (``lean_loop.full_attention_only``)."""
    if not (options.static_cache and options.cuda_graphs and loaded.device.type == "cuda"):
        return None
    return "cuda" if full_attention_only(loaded.model) else None


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
    cache = options.vision_cache
    # image features from the cache: the tower does not run, so its pixels need not move
    served = cache is not None and cache.serves(specimen_ids)
    inputs = to_device(loaded, inputs, ("pixel_values",) if served else ())
    gen_config = loaded.model.generation_config
    # A forced end token at max length (BART, Florence-2) would replace the last token and
    # hide truncation. generate() refills None arguments from the model's generation config,
    # so it is switched off there for the call.
    forced_eos, gen_config.forced_eos_token_id = gen_config.forced_eos_token_id, None
    try:
        with torch.inference_mode():
            lean, graphs = _use_lean(loaded, inputs, max_new_tokens, forced, options, collate_rows)
            scope = cache.batch(specimen_ids) if cache is not None else contextlib.nullcontext()
            processors = _forced_processors(loaded, forced)
            with scope:
                if lean:
                    tokens, logprobs = lean_greedy(
                        loaded, inputs, max_new_tokens, processors, options.scores,
                        static_cache=options.static_cache, graphs=graphs,
                    )  # fmt: skip
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


def verdict_key(loaded: LoadedModel, options: GenerateOptions) -> str:
    config = loaded.model.generation_config.to_diff_dict()
    return json.dumps([config, options.static_cache, options.compile], sort_keys=True, default=str)


def _verdict(loaded: LoadedModel, options: GenerateOptions) -> tuple[bool, str | None] | None:
    """``(lean loop on, graph mode)`` once decided for this model and options, else None."""
    return loaded.lean_verdicts.get(verdict_key(loaded, options))


def check_lean(
    loaded: LoadedModel,
    part: dict[str, torch.Tensor],
    max_new_tokens: int,
    forced: list[str | None] | None,
    options: GenerateOptions,
) -> bool:
    """Whether the lean loop serves this model: decided once per model, generation config (a
    checkpoint may bring its own ``generation_config.json``) and cache kind by decoding
    ``part``, a small batch on the model's device, both ways. With a static cache on CUDA the
    lean loop is checked with CUDA-graph steps first, then without them. The runner calls it
    early, on two specimens of the first prepared chunk while the rest of the split is
    prepared; else the first batch does (``_use_lean``)."""
    verdicts = loaded.lean_verdicts
    key = verdict_key(loaded, options)
    if key in verdicts:
        return verdicts[key][0]
    reason = lean_blocker(loaded, options)
    graphs = graph_mode(loaded, options) if reason is None else None
    while reason is None:
        try:
            if _lean_matches(loaded, part, max_new_tokens, forced, options, graphs):
                break
            reason = "it differed from HF generate on the first batch"
        except torch.OutOfMemoryError:
            raise  # the caller halves the batch
        except Exception as exc:  # e.g. a generation hook another transformers version lacks
            reason = f"it failed on the first batch ({type(exc).__name__}: {exc})"
        if graphs is None:
            break
        log.warning("CUDA-graph decoding steps are off for %s: %s", loaded.family, reason)
        graphs, reason = None, None  # try again without graphs
    if reason is None and graphs is not None:
        log.info("decoding steps replay CUDA graphs (static KV cache, checked against HF)")
    if reason is not None:
        if lean_blocker(loaded, options) is None:
            log.warning("lean greedy decoding is off for %s: %s", loaded.family, reason)
        else:
            log.info("HF generate (lean greedy loop off: %s)", reason)
    if options.lean:  # the verdict holds for this model whatever the batch
        verdicts[key] = (reason is None, graphs)
    return reason is None


def _use_lean(
    loaded, inputs, max_new_tokens, forced, options, collate_rows
) -> tuple[bool, str | None]:
    """``(lean loop, graph mode)``: the lean loop where it is exact, with CUDA-graph steps
    where those are (``check_lean`` on this batch unless decided)."""
    verdict = _verdict(loaded, options)
    if verdict is None:
        part, few = inputs, forced
        if collate_rows is not None and lean_blocker(loaded, options) is None:
            # the longest and the shortest prompt: the check covers left padding
            rows = sorted({0, inputs["input_ids"].shape[0] - 1})
            part = to_device(loaded, collate_rows(rows))
            few = None if forced is None else [forced[r] for r in rows]
        check_lean(loaded, part, max_new_tokens, few, options)
        verdict = _verdict(loaded, options) or (False, None)  # not kept with lean: false
    return verdict[0], verdict[1] if verdict[0] else None
