"""The lean greedy loop against HF generate, on the real tiny models of every family."""

from __future__ import annotations

import logging

import pytest
import torch

from vieval_runner.generate import decoding, lean_loop
from vieval_runner.generate.batches import generate
from vieval_runner.generate.decoding import hf_generate, lean_blocker, lean_greedy
from vieval_runner.generate.forced import ForcedTextLogitsProcessor
from vieval_runner.generate.options import GenerateOptions
from vieval_runner.prepare.inputs import prepare
from vieval_runner.testing.fixtures import (
    decoder_only_families,
    load_at_200,
    padded_batch,
    versions_note,
)

DECODER_ONLY = decoder_only_families()


@pytest.fixture(scope="module")
def loaded_at(loaded_at_200):
    """family -> LoadedModel at checkpoint-200 (conftest's, once per module)."""
    return lambda family: loaded_at_200(family)[0]


def _both(loaded, inputs, max_new_tokens, processors=lambda: []):
    with torch.inference_mode():
        ref, ref_lp = hf_generate(
            loaded, inputs, max_new_tokens, processors(), GenerateOptions(scores=True)
        )
        new, new_lp = lean_greedy(loaded, inputs, max_new_tokens, processors(), True)
    return ref[:, inputs["input_ids"].shape[1] :], ref_lp, new, new_lp


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_lean_loop_gives_hf_generate_tokens_and_scores(loaded_at, specimens, family):
    loaded = loaded_at(family)
    inputs = padded_batch(loaded, specimens)
    ref, ref_lp, new, new_lp = _both(loaded, inputs, 12)
    assert new.shape[1] >= ref.shape[1]
    assert torch.equal(new[:, : ref.shape[1]], ref), versions_note()
    assert torch.allclose(new_lp[:, : ref.shape[1]], ref_lp, atol=1e-5), versions_note()
    assert len({tuple(r) for r in ref.tolist()}) > 1  # rows differ: the check can fail


@pytest.mark.parametrize("family", ["qwen25_vl", "paligemma"])
def test_lean_loop_stops_like_hf_on_end_tokens(loaded_at, specimens, family):
    """Forced answers of different lengths: rows that ended get pad, the loop stops early."""
    loaded = loaded_at(family)
    inputs = padded_batch(loaded, specimens)
    rows = inputs["input_ids"].shape[0]
    texts = [("red circle " * (1 + i % 3)).strip() for i in range(rows)]
    tokenizer = loaded.processor.tokenizer
    eos = decoding.end_ids(loaded)[0]

    def forced():
        return [ForcedTextLogitsProcessor(tokenizer, texts, eos)]

    ref, _, new, _ = _both(loaded, inputs, 40, forced)
    assert ref.shape[1] < 40  # every row ended: HF stopped early
    assert torch.equal(new[:, : ref.shape[1]], ref), versions_note()
    assert new.shape[1] == ref.shape[1]  # on the CPU the loop checks every step


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma"])
def test_score_settings_of_the_generation_config_are_applied(loaded_at, specimens, family):
    """repetition_penalty (whose prompt handling changed between transformers releases),
    no_repeat_ngram_size and suppress_tokens go through HF's own processors: same tokens."""
    loaded = loaded_at(family)
    inputs = padded_batch(loaded, specimens)
    gen = loaded.model.generation_config
    plain = _both(loaded, inputs, 10)[0]
    try:
        gen.repetition_penalty, gen.no_repeat_ngram_size = 1.8, 2
        gen.suppress_tokens = [int(t) for t in plain[:, 0].unique()]  # ban the first choices
        assert lean_blocker(loaded, GenerateOptions()) is None
        ref, ref_lp, new, new_lp = _both(loaded, inputs, 10)
    finally:
        gen.repetition_penalty, gen.no_repeat_ngram_size, gen.suppress_tokens = 1.0, 0, None
    assert not torch.equal(ref, plain)  # the settings changed the output: the test can fail
    assert torch.equal(new[:, : ref.shape[1]], ref), versions_note()
    assert torch.allclose(new_lp[:, : ref.shape[1]], ref_lp, atol=1e-5), versions_note()


def test_blockers_name_why_hf_generate_is_used(loaded_at):
    assert lean_blocker(loaded_at("florence2"), GenerateOptions()) == "encoder-decoder model"
    loaded = loaded_at("paligemma")
    assert lean_blocker(loaded, GenerateOptions(static_cache=True)) is None  # test_step_graph
    assert lean_blocker(loaded, GenerateOptions(compile=True)).startswith("compile")
    assert lean_blocker(loaded, GenerateOptions(lean=False)) == "lean: false"
    gen = loaded.model.generation_config
    try:  # contrastive search and stop strings are other algorithms, not other scores
        gen.penalty_alpha, gen.stop_strings = 0.6, ["}"]
        assert lean_blocker(loaded, GenerateOptions()) == (
            "generation config sets penalty_alpha, stop_strings"
        )
        gen.penalty_alpha, gen.stop_strings, gen.num_beams = None, None, 4  # generate passes 1
        assert lean_blocker(loaded, GenerateOptions()) is None
    finally:
        gen.penalty_alpha, gen.stop_strings, gen.num_beams = None, None, 1


def test_generate_is_identical_with_and_without_the_lean_loop(loaded_at, specimens):
    for family in ("qwen2_vl", "smolvlm"):
        loaded = loaded_at(family)
        prepared = prepare(loaded, specimens)
        runs = [
            generate(
                loaded,
                prepared,
                batch_size=4,
                max_new_tokens=9,
                options=GenerateOptions(lean=lean, scores=True),
            )  # fmt: skip
            for lean in (True, False)
        ]
        assert [g.text for g in runs[0]] == [g.text for g in runs[1]]
        for a, b in zip(*runs, strict=True):
            assert (a.n_new_tokens, a.truncated) == (b.n_new_tokens, b.truncated)
            assert a.confidence == pytest.approx(b.confidence, abs=1e-6)


def _fresh(tiny_run, family, specimens):
    """A model of its own (its lean verdict starts unknown), its inputs and HF's texts."""
    loaded = load_at_200(tiny_run(family), dtype="fp32")
    prepared = prepare(loaded, specimens)
    expected = generate(loaded, prepared, 4, 8, options=GenerateOptions(lean=False))
    return loaded, prepared, [g.text for g in expected]


def test_a_lean_loop_that_drifts_from_hf_is_switched_off(tiny_run, specimens, monkeypatch, caplog):
    """As if a transformers release changed a hook: the first-batch check catches it."""
    loaded, prepared, expected = _fresh(tiny_run, "llava", specimens)
    real = lean_loop._greedy_scores

    def drifted(scores, *args):
        scores = real(scores, *args)
        return scores.flip(-1)  # picks other tokens than HF would

    monkeypatch.setattr(lean_loop, "_greedy_scores", drifted)
    lean_calls = []
    real_lean = decoding.lean_greedy
    monkeypatch.setattr(
        decoding, "lean_greedy", lambda *a, **k: lean_calls.append(1) or real_lean(*a, **k)
    )
    with caplog.at_level(logging.WARNING, logger="vieval"):
        out = generate(loaded, prepared, batch_size=4, max_new_tokens=8)
    assert [g.text for g in out] == expected  # HF generate did the work
    assert "lean greedy decoding is off for llava" in caplog.text
    assert lean_calls == [1]  # only the check ran the lean loop; not the batches
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vieval"):
        generate(loaded, prepared, batch_size=4, max_new_tokens=8)
    assert lean_calls == [1] and "lean" not in caplog.text  # decided once per model and config


def test_a_lean_loop_that_fails_is_switched_off(tiny_run, specimens, monkeypatch, caplog):
    """A hook with another signature (another transformers release) raises: HF generate runs."""
    loaded, prepared, expected = _fresh(tiny_run, "paligemma", specimens)

    def broken(*args, **kwargs):
        raise TypeError("prepare_inputs_for_generation() got an unexpected keyword argument")

    monkeypatch.setattr(decoding, "lean_greedy", broken)
    with caplog.at_level(logging.WARNING, logger="vieval"):
        out = generate(loaded, prepared, batch_size=4, max_new_tokens=8)
    assert [g.text for g in out] == expected
    assert "lean greedy decoding is off for paligemma: it failed on the first batch (TypeError" in (
        caplog.text
    )


@pytest.mark.gpu
@pytest.mark.parametrize("family", DECODER_ONLY)
def test_lean_loop_gives_hf_generate_tokens_on_gpu(tiny_run, specimens, family):
    """bf16 on CUDA: the same forward calls, so the same tokens (and the 4-step stop check)."""
    loaded = load_at_200(tiny_run(family), device="cuda", dtype="bf16")
    inputs = padded_batch(loaded, specimens)
    ref, ref_lp, new, new_lp = _both(loaded, inputs, 12)
    assert torch.equal(new[:, : ref.shape[1]].cpu(), ref.cpu())
    assert torch.isin(new[:, ref.shape[1] :].cpu(), torch.tensor(decoding.end_ids(loaded))).all()
    assert torch.allclose(new_lp[:, : ref.shape[1]].float(), ref_lp.float(), atol=1e-3)


def _decode_step_masks(monkeypatch, run) -> list:
    """The attention masks SDPA receives on one-token steps while ``run()`` decodes."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen, real = [], ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        if query.shape[2] == 1:
            seen.append(None if attention_mask is None else attention_mask.clone())
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
        run()
    return seen


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_decoding_steps_get_the_masks_hf_builds(loaded_at, specimens, family, monkeypatch):
    """The lean loop passes each one-token step the mask HF's ``create_causal_mask`` builds
    (same values, shape and layout), from its own buffer instead of rebuilding it."""
    loaded = loaded_at(family)
    inputs = padded_batch(loaded, specimens)
    assert decoding.step_mask_buffer(loaded.model, inputs["attention_mask"], 6) is not None
    with torch.inference_mode():
        ref = _decode_step_masks(
            monkeypatch, lambda: hf_generate(loaded, inputs, 6, [], GenerateOptions())
        )
        new = _decode_step_masks(monkeypatch, lambda: lean_greedy(loaded, inputs, 6, [], False))
    assert len(ref) == len(new) > 0
    for ours, theirs in zip(new, ref, strict=True):
        assert theirs is not None and ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert ours.is_contiguous() and torch.equal(ours, theirs), versions_note()
    assert not bool(ref[-1].all())  # padding present: masks that differ would show


def test_step_masks_stay_hf_where_the_mask_could_differ(loaded_at, specimens):
    loaded = loaded_at("qwen2_vl")
    mask = padded_batch(loaded, specimens)["attention_mask"]
    model = loaded.model
    assert decoding.step_mask_buffer(model, mask, 4).shape[-1] == mask.shape[1] + 4
    assert decoding.step_mask_buffer(model, torch.ones_like(mask), 4) is None  # HF may skip it
    assert decoding.step_mask_buffer(model, None, 4) is None
    text = model.config.get_text_config()
    for name, value in [("_attn_implementation", "eager"), ("layer_types", ["sliding_attention"])]:
        old = getattr(text, name)
        try:
            setattr(text, name, value)
            assert decoding.step_mask_buffer(model, mask, 4) is None, name
        finally:
            setattr(text, name, old)
