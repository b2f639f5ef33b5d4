"""Static-cache decoding in the lean loop and its CUDA-graph steps: HF's static-cache tokens,
the same tokens when the steps run from captured buffers, and a decoding-step forward that
never reads a device value back to the host (what a CUDA graph capture requires)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vieval_runner.generate import decoding, lean_loop, step_graph
from vieval_runner.generate.batches import generate
from vieval_runner.generate.decoding import hf_generate, lean_greedy
from vieval_runner.generate.options import GenerateOptions
from vieval_runner.prepare.inputs import prepare
from vieval_runner.testing.fixtures import (
    decoder_only_families,
    load_at_200,
    padded_batch,
    versions_note,
)

DECODER_ONLY = decoder_only_families()

aten = torch.ops.aten


@pytest.fixture(scope="module")
def loaded_at(loaded_at_200):
    return lambda family: loaded_at_200(family)[0]


def _hf_static(loaded, inputs, max_new_tokens):
    loaded.model.__dict__.pop("_previous_max_cache_length", None)  # size the cache afresh
    out, lp = hf_generate(
        loaded, inputs, max_new_tokens, [], GenerateOptions(static_cache=True, scores=True)
    )
    return out[:, inputs["input_ids"].shape[1] :], lp


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_static_lean_loop_gives_hf_static_cache_tokens(loaded_at, specimens, family):
    loaded = loaded_at(family)
    inputs = padded_batch(loaded, specimens)
    with torch.inference_mode():
        ref, ref_lp = _hf_static(loaded, inputs, 10)
        new, new_lp = lean_greedy(loaded, inputs, 10, [], True, static_cache=True)
        replayed, replayed_lp = lean_greedy(
            loaded, inputs, 10, [], True, static_cache=True, graphs="call"
        )
    n = ref.shape[1]
    assert torch.equal(new[:, :n], ref), versions_note()
    assert torch.allclose(new_lp[:, :n], ref_lp, atol=1e-5), versions_note()
    assert torch.equal(replayed, new) and torch.equal(replayed_lp, new_lp)
    assert len({tuple(r) for r in ref.tolist()}) > 1  # rows differ: the check can fail


class HostReads(TorchDispatchMode):
    """Records operations a CUDA graph capture cannot contain: reading a value to the host
    (``item``, ``bool``, ``equal``) and outputs whose shape depends on values."""

    SCALAR = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
    DATA_SHAPED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                   aten.unique_consecutive.default, aten.unique_dim.default}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        if func in self.SCALAR or func in self.DATA_SHAPED or bool_index:
            self.seen.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_decoding_step_forward_reads_nothing_back(loaded_at, specimens, family, monkeypatch):
    loaded = loaded_at(family)
    if not lean_loop.full_attention_only(loaded.model):
        pytest.skip(f"{family}: sliding or chunked layers, no CUDA graphs")
    inputs = padded_batch(loaded, specimens)
    steps, tolist_calls = [], []
    real_run = step_graph.StepGraph.run
    real_tolist = torch.Tensor.tolist

    def watched_run(self, model_inputs):
        mode = HostReads()
        monkeypatch.setattr(
            torch.Tensor, "tolist", lambda t: tolist_calls.append(1) or real_tolist(t)
        )
        try:
            with mode:
                return real_run(self, model_inputs)
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
            steps.append(mode.seen)

    monkeypatch.setattr(step_graph.StepGraph, "run", watched_run)
    with torch.inference_mode():
        lean_greedy(loaded, inputs, 6, [], False, static_cache=True, graphs="call")
    assert len(steps) == 4  # prefill and step 1 eager; steps 2-5 from the buffers
    assert steps == [[]] * 4, f"{family}: host reads in a decoding step: {steps[0]}"
    assert not tolist_calls


def test_step_graph_accepts_only_the_captured_shapes():
    class Echo(torch.nn.Module):
        def forward(self, input_ids, cache=None, logits_to_keep=1, return_dict=True):
            return {"logits": input_ids * 2}

    cache = object()
    captured = step_graph.StepGraph(
        Echo(), {"input_ids": torch.ones(2, 1), "cache": cache, "logits_to_keep": 1},
        replay_by_call=True,
    )  # fmt: skip
    ok = {"input_ids": torch.full((2, 1), 3.0), "cache": cache, "logits_to_keep": 1}
    assert captured.accepts(ok)
    assert torch.equal(captured.run(ok)["logits"], torch.full((2, 1), 6.0))
    assert not captured.accepts({**ok, "input_ids": torch.ones(3, 1)})  # other shape
    assert not captured.accepts({**ok, "cache": object()})  # another cache object
    assert not captured.accepts({**ok, "logits_to_keep": 2})
    assert not captured.accepts({**ok, "position_ids": torch.ones(2, 1)})  # another input


def test_static_cache_runs_use_the_lean_loop_once_checked(tiny_run, specimens, caplog):
    loaded = load_at_200(tiny_run("qwen2_vl"), dtype="fp32")
    prepared = prepare(loaded, specimens)
    options = GenerateOptions(static_cache=True)
    with caplog.at_level(logging.INFO, logger="vieval"):
        static = generate(loaded, prepared, batch_size=4, max_new_tokens=9, options=options)
    assert "HF generate" not in caplog.text and "off" not in caplog.text
    key = decoding.verdict_key(loaded, options)
    assert loaded.lean_verdicts[key] == (True, None)  # CPU: no graphs
    hf = generate(loaded, prepared, 4, 9, options=GenerateOptions(static_cache=True, lean=False))
    assert [g.text for g in static] == [g.text for g in hf]


def test_a_failing_graph_capture_falls_back_to_eager_steps(
    tiny_run, specimens, monkeypatch, caplog
):
    loaded = load_at_200(tiny_run("qwen2_vl"), dtype="fp32")
    prepared = prepare(loaded, specimens)
    monkeypatch.setattr(decoding, "graph_mode", lambda loaded, options: "call")

    def broken_capture(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(lean_loop, "StepGraph", broken_capture)
    options = GenerateOptions(static_cache=True)
    with caplog.at_level(logging.WARNING, logger="vieval"):
        out = generate(loaded, prepared, batch_size=4, max_new_tokens=9, options=options)
    assert "CUDA-graph decoding steps are off for qwen2_vl: it failed on the first batch" in (
        caplog.text
    )
    assert "lean greedy decoding is off" not in caplog.text
    assert loaded.lean_verdicts[decoding.verdict_key(loaded, options)] == (
        True,
        None,
    )
    hf = generate(loaded, prepared, 4, 9, options=GenerateOptions(static_cache=True, lean=False))
    assert [g.text for g in out] == [g.text for g in hf]


@pytest.mark.gpu
@pytest.mark.parametrize("family", DECODER_ONLY)
def test_cuda_graph_steps_give_the_eager_static_tokens(tiny_run, specimens, family):
    loaded = load_at_200(tiny_run(family), device="cuda", dtype="fp32")
    if not lean_loop.full_attention_only(loaded.model):
        pytest.skip(f"{family}: sliding or chunked layers, no CUDA graphs")
    inputs = padded_batch(loaded, specimens)
    with torch.inference_mode():
        eager, eager_lp = lean_greedy(loaded, inputs, 10, [], True, static_cache=True)
        graphed, graphed_lp = lean_greedy(
            loaded, inputs, 10, [], True, static_cache=True, graphs="cuda"
        )
        ref, _ = _hf_static(loaded, inputs, 10)
    assert torch.equal(graphed.cpu(), eager.cpu())
    assert torch.allclose(graphed_lp.cpu(), eager_lp.cpu(), atol=1e-5)
    assert torch.equal(graphed[:, : ref.shape[1]].cpu(), ref.cpu())


def test_no_capture_when_too_few_steps_follow(loaded_at, specimens, monkeypatch):
    """A capture costs about one eager step: with fewer than two steps left to replay it
    would not pay, so short generations never capture."""
    loaded = loaded_at("qwen2_vl")
    inputs = padded_batch(loaded, specimens)
    captures: list = []
    real = lean_loop.StepGraph
    monkeypatch.setattr(lean_loop, "StepGraph", lambda *a, **k: captures.append(1) or real(*a, **k))
    with torch.inference_mode():
        for new_tokens, expected in ((2, 0), (3, 0), (4, 1)):
            captures.clear()
            lean_greedy(loaded, inputs, new_tokens, [], False, static_cache=True, graphs="call")
            assert len(captures) == expected, new_tokens
