"""Per-box scores: each box's score is exp(mean log-probability) of the tokens that wrote it.

The assignment is checked on synthetic (text, token ends, log-probabilities); end to end, two
boxes written with different token probabilities by a real tiny model (scripted answers,
boosted rather than forced) must get different scores equal to those computed from HF
``generate(output_scores=True)`` + ``compute_transition_scores``, survive the store and be
re-derived by ``vieval rescore`` without the model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from vieval_runner import parsing, store
from vieval_runner.config import config_from_dict, dump_config
from vieval_runner.generate import batches as generation
from vieval_runner.generate.decoding import TOKENIZER_LOCK, end_ids, pad_id
from vieval_runner.generate.forced import ForcedTextLogitsProcessor, SoftScript
from vieval_runner.generate.options import GenerateOptions
from vieval_runner.pipeline import rescore, results
from vieval_runner.prepare.inputs import prepare
from vieval_runner.records import Box
from vieval_runner.testing.fixtures import make_specimens, versions_note

# ---------------------------------------------------------------- the assignment itself


def test_box_scores_average_the_tokens_that_overlap_each_span():
    # text:   '[{"a": 1}, {"b": 2}]'  tokens: '[{' '"a": 1' '}, {' '"b"' ': 2}' ']'
    ends = [2, 8, 12, 15, 19, 20]
    logprobs = [-0.1, -0.2, -0.3, -1.0, -2.0, -0.5]
    first = Box(0, 0, 1, 1, span=(1, 9))  # '{"a": 1}': tokens 0, 1, 2
    second = Box(0, 0, 1, 1, span=(11, 19))  # '{"b": 2}': tokens 2, 3, 4
    no_span = Box(0, 0, 1, 1)
    past_end = Box(0, 0, 1, 1, span=(25, 30))
    got = results.box_token_scores([first, second, no_span, past_end], ends, logprobs, 0.42)
    assert got[0] == pytest.approx(math.exp((-0.1 - 0.2 - 0.3) / 3))
    assert got[1] == pytest.approx(math.exp((-0.3 - 1.0 - 2.0) / 3))
    assert got[2:] == [0.42, 0.42]  # no span / no token: the sequence confidence


def test_box_scores_edge_cases():
    # a token completing no character (first byte of a multi-byte one) counts for the
    # character it starts; offsets that go back are clamped; a -inf token falls back
    ends = [1, 1, 2, 3]
    logprobs = [-1.0, -2.0, -3.0, -4.0]
    got = results.box_token_scores([Box(0, 0, 1, 1, span=(1, 2))], ends, logprobs)
    assert got == [pytest.approx(math.exp(-2.5))]  # tokens 1 (empty, starts at 1) and 2
    got = results.box_token_scores([Box(0, 0, 1, 1, span=(0, 1))], [1, 0, 2], [-1.0, -1.0, -9])
    assert got == [pytest.approx(math.exp(-1.0))]
    inf = results.box_token_scores([Box(0, 0, 1, 1, span=(0, 1))], [1], [-math.inf], 0.3)
    assert inf == [0.3]


def test_parse_text_scores_each_box_and_falls_back_to_confidence():
    spec = make_specimens()[0]
    text = '[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]'
    mid = text.index("}, {") + 2
    ends = [mid, len(text)]  # two "tokens": one per box
    p = results.parse_text(spec, text, None, "qwen3_vl_json", None, 0.5, [-1.0, -3.0], ends)
    assert [b.score for b in p.pred_boxes] == pytest.approx([math.exp(-1.0), math.exp(-3.0)])
    assert (p.token_logprobs, p.token_ends) == ([-1.0, -3.0], ends)
    row = store.prediction_row(p)
    assert (row["token_logprobs"], row["token_ends"]) == ([-1.0, -3.0], ends)
    old = results.parse_text(spec, text, None, "qwen3_vl_json", None, 0.5)  # an older store
    assert [b.score for b in old.pred_boxes] == [0.5, 0.5]
    bad = results.parse_text(spec, text, None, "qwen3_vl_json", None, 0.5, [-1.0], ends)
    assert [b.score for b in bad.pred_boxes] == [0.5, 0.5]  # lengths disagree: no guessing


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma", "florence2"])
def test_token_ends_are_the_lengths_of_decoded_prefixes(loaded_at_200, family):
    """The fast path (incremental decoder) equals decoding every prefix, on text with
    special tokens and multi-byte characters split across byte-level tokens."""
    loaded, _ = loaded_at_200(family)
    tok = loaded.processor.tokenizer
    texts = {
        "qwen2_vl": "<|object_ref_start|>caf\u00e9 \u65e5\u672c<|object_ref_end|>"
        "<|box_start|>(1,2),(3,4)<|box_end|>",
        "paligemma": "<loc0010><loc0020><loc0030><loc0040> caf\u00e9 ; <loc0001> \u65e5",
        "florence2": "caf\u00e9<loc_1><loc_2><loc_3><loc_4>\u65e5\u672c<loc_5>",
    }
    ids = tok.encode(texts[family], add_special_tokens=False)
    with TOKENIZER_LOCK:
        text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ends = generation.token_ends(tok, ids, text)
    want, last = [], 0
    for i in range(len(ids)):
        piece = tok.decode(ids[: i + 1], skip_special_tokens=False)
        n = next((k for k in range(min(len(piece), len(text))) if piece[k] != text[k]), None)
        last = max(last, len(piece) if n is None and len(piece) <= len(text) else (n or 0))
        want.append(last)
    assert ends == want and ends[-1] == len(text)
    assert any(a == b for a, b in zip(ends, ends[1:], strict=False))  # a split character


# ---------------------------------------------------------------- end to end

FORMATS = {"qwen3_vl": "qwen3_vl_json", "florence2": "florence2_loc"}
MARGINS = (1.0, 5.0)  # box 1 is written far less confidently than box 2


def _two_boxes(family: str, spec) -> tuple[str, list[str]]:
    """A scripted two-box answer and the text of each box's structure in it."""
    if family == "qwen3_vl":
        parts = [
            json.dumps({"bbox_2d": [100, 200, 400, 500], "label": "red circle"}),
            json.dumps({"bbox_2d": [500, 100, 900, 300], "label": "blue square"}),
        ]
        return "```json\n[" + ", ".join(parts) + "]\n```", parts
    parts = ["red circle<loc_100><loc_200><loc_400><loc_500>"]
    parts.append("blue square<loc_500><loc_100><loc_900><loc_300>")
    return "".join(parts), parts


def _scripts(loaded, family: str, specimens) -> tuple[list[SoftScript], list[list[list[int]]]]:
    """Per specimen: the soft script (margins per token: MARGINS[k] on box k's tokens, forced
    elsewhere) and, per box, the indices of the tokens overlapping its structure (from the
    tokenizer's own offsets, independent of the code under test)."""
    tok = loaded.processor.tokenizer
    scripts, box_tokens = [], []
    for n, spec in enumerate(specimens):
        text, parts = _two_boxes(family, spec)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == tok.encode(text, add_special_tokens=False)
        ranges = [(text.index(p), text.index(p) + len(p)) for p in parts]
        owners = [
            [k for k, (a, b) in enumerate(ranges) if s < b and e > a]
            for s, e in enc["offset_mapping"]
        ]
        shift = 0.5 * n  # each specimen its own probabilities
        margins = [MARGINS[o[0]] + shift if o else None for o in owners]
        scripts.append(SoftScript(text, margins))
        box_tokens.append([[i for i, o in enumerate(owners) if k in o] for k in range(2)])
    return scripts, box_tokens


def _hf_logprobs(loaded, prepared, scripts) -> list[list[float]]:
    """Per specimen, the new tokens' log-probabilities from HF generate + transition scores."""
    inputs = {k: v.to(loaded.device) for k, v in generation.collate(loaded, prepared).items()}
    gen = loaded.model.generation_config
    forced_eos, gen.forced_eos_token_id = gen.forced_eos_token_id, None
    try:
        with torch.inference_mode():
            out = loaded.model.generate(
                **inputs,
                max_new_tokens=80,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id(loaded),
                eos_token_id=end_ids(loaded),
                logits_processor=[
                    ForcedTextLogitsProcessor(
                        loaded.processor.tokenizer, scripts, end_ids(loaded)[0]
                    )
                ],
                output_scores=True,
                return_dict_in_generate=True,
            )
            scores = loaded.model.compute_transition_scores(
                out.sequences, out.scores, normalize_logits=True
            )
    finally:
        gen.forced_eos_token_id = forced_eos
    return [row.tolist() for row in scores.float()]


@pytest.mark.parametrize("family", ["qwen3_vl", "florence2"])
def test_two_boxes_written_with_different_probabilities_get_their_own_scores(
    loaded_at_200, family, tmp_path
):
    loaded, run = loaded_at_200(family)
    specimens = make_specimens()[:2]
    prepared = prepare(loaded, specimens)
    scripts, box_tokens = _scripts(loaded, family, specimens)
    options = GenerateOptions(scores=True)
    outs = generation.generate(
        loaded, prepared, batch_size=2, max_new_tokens=80, forced_texts=scripts, options=options
    )
    session = SimpleNamespace(output_format=FORMATS[family], coords=None)
    predictions = [results.parse_one(session, s, o) for s, o in zip(specimens, outs, strict=True)]

    # the reference: HF generate on the same inputs, same order (one batch, no sorting)
    reference = _hf_logprobs(loaded, prepared, scripts)
    for script, out, pred, ref, tokens in zip(
        scripts, outs, predictions, reference, box_tokens, strict=True
    ):
        assert out.text == str(script)
        assert pred.parse_status == "ok" and len(pred.pred_boxes) == 2
        want = [math.exp(sum(ref[i] for i in ix) / len(ix)) for ix in tokens]
        got = [b.score for b in pred.pred_boxes]
        assert got == pytest.approx(want, rel=1e-5), (family, got, want, versions_note())
        assert got[1] - got[0] > 0.05  # the boosted-more box scores clearly higher
        assert pred.confidence is not None and got[0] < pred.confidence < got[1]

    # HF generate path (lean loop off) gives the same per-box scores
    hf = generation.generate(
        loaded,
        prepared,
        batch_size=2,
        max_new_tokens=80,
        forced_texts=scripts,
        options=GenerateOptions(scores=True, lean=False),
    )
    for out, pred, spec in zip(hf, predictions, specimens, strict=True):
        again = results.parse_one(session, spec, out)
        assert [b.score for b in again.pred_boxes] == pytest.approx(
            [b.score for b in pred.pred_boxes], rel=1e-5
        )

    _store_and_rescore(tmp_path, run, family, specimens, predictions)


def _store_and_rescore(tmp_path, run, family, specimens, predictions) -> None:
    """The per-token columns reach the store; ``vieval rescore`` re-derives the same scores."""
    root = str(tmp_path / "store")
    config = config_from_dict(
        {
            "run_dir": str(run.run_dir),
            "base_model": str(run.base_model_dir),
            "store": root,
            "task": "grounding",
            "data": {"path": str(tmp_path)},
            "device": "cpu",
            "box_scores": True,
        }
    )
    aggregates = results.score_predictions(config, specimens, predictions, device="cpu")
    store.create_store(root)
    store.write_specimens(root, specimens, "v1")
    eval_row = {
        "eval_id": "e1",
        "run_id": "r",
        "step": 200,
        "status": "ok",
        "config": json.dumps(dump_config(config)),
        "output_format": FORMATS[family],
        "model_family": family,
        "parser_version": parsing.PARSER_VERSION,
        "dataset_version": "v1",
        **{k: v for k, v in aggregates.items() if k in store.AGGREGATE_METRICS},
    }
    store.commit_step(root, eval_row, results.prediction_rows("r", 200, "e1", predictions))
    rows = store.open_store(root).step("r", 200).to_pylist()
    by_id = {r["specimen_id"]: r for r in rows}
    for p in predictions:
        row = by_id[p.specimen_id]
        assert [b["score"] for b in row["pred_boxes"]] == [b.score for b in p.pred_boxes]
        assert row["token_ends"] == p.token_ends
        assert row["token_logprobs"] == p.token_logprobs  # float32 values: exact round trip
    rescore.rescore_store(root, console=Console(quiet=True))
    again = {r["specimen_id"]: r for r in store.open_store(root).step("r", 200).to_pylist()}
    for sid, row in by_id.items():
        assert again[sid]["pred_boxes"] == row["pred_boxes"]
        assert again[sid]["eval_id"] != row["eval_id"]  # really re-committed
    aps = [e["ap"] for e in store.open_store(root).evaluations("r").to_pylist()]
    assert len(aps) == 2 and aps[0] == aps[1]


@pytest.mark.parametrize("family", ["qwen2_vl", "florence2"])
def test_free_generation_keeps_tokens_aligned_with_the_decoded_text(loaded_at_200, family):
    """Unscripted output (Florence-2: the forced <s> lead token is dropped): one log-probability
    and one end offset per content token, the last offset at the end of the text, and the
    sequence confidence is their exp(mean)."""
    loaded, _ = loaded_at_200(family)
    prepared = prepare(loaded, make_specimens()[:3])
    outs = generation.generate(
        loaded,
        prepared,
        batch_size=3,
        max_new_tokens=10,
        options=GenerateOptions(scores=True),
    )
    tok = loaded.processor.tokenizer
    for out in outs:
        assert len(out.token_logprobs) == len(out.token_ends) == out.n_new_tokens > 0
        assert out.token_ends[-1] == len(out.text)
        mean = sum(out.token_logprobs) / len(out.token_logprobs)
        assert out.confidence == pytest.approx(math.exp(mean), rel=1e-5)
        if family == "florence2":
            assert not out.text.startswith(tok.bos_token)


# ---------------------------------------------------------------- stored intervals


def _scoring_config(tmp_path, task: str, **scoring) -> object:
    return config_from_dict(
        {"run_dir": str(tmp_path / "run"), "base_model": str(tmp_path / "base"),
         "store": str(tmp_path / "store"), "task": task, "data": {"path": str(tmp_path)},
         "device": "cpu", "scoring": scoring}
    )  # fmt: skip


def test_stored_vqa_intervals_include_bleu_from_the_answers(tmp_path):
    from vieval_runner.records import Prediction
    from vieval_runner.testing.vqa_stat_store import (
        corpus_bleu,
        sacrebleu_interval,
        vqa_answers,
        vqa_specimens,
    )

    specimens = vqa_specimens(60, seed=2)
    answers = vqa_answers(specimens, 0.5, seed=3)
    predictions = [Prediction(s.specimen_id, a, "ok", pred_answer=a)
                   for s, a in zip(specimens, answers, strict=True)]  # fmt: skip
    config = _scoring_config(tmp_path, "vqa", bootstrap_resamples=300, bootstrap_seed=7)
    aggregates = results.score_predictions(config, specimens, predictions, device="cpu")
    refs = [s.ref_answers for s in specimens]
    assert aggregates["bleu"] == pytest.approx(corpus_bleu(answers, refs), abs=1e-9)
    # reference: sacrebleu's corpus BLEU of every resample (the configured count and seed)
    ref = sacrebleu_interval(answers, refs, n_resamples=300, seed=7)
    assert aggregates["ci95"]["bleu"] == pytest.approx(ref, abs=1e-9)


def test_stored_ap_intervals_use_the_configured_ap_resamples(tmp_path):
    from vieval_runner.records import Prediction
    from vieval_runner.scoring import intervals
    from vieval_runner.testing.stat_stores import stat_specimens

    specimens = stat_specimens(40)
    preds = [[Box(b.x1 + 3 * (i % 4), b.y1, b.x2, b.y2, b.label, score=0.1 + 0.02 * i)
              for b in s.ref_boxes] for i, s in enumerate(specimens)]  # fmt: skip
    predictions = [Prediction(s.specimen_id, "x", "ok", pred_boxes=p)
                   for s, p in zip(specimens, preds, strict=True)]  # fmt: skip
    refs = [s.ref_boxes for s in specimens]
    for count in (50, 200):
        config = _scoring_config(tmp_path, "grounding", ap_bootstrap_resamples=count)
        got = results.score_predictions(config, specimens, predictions, device="cpu")["ci95"]
        assert got["ap"] == intervals.ap_intervals(preds, refs, n_resamples=count)["ap"]
    assert got["ap"] != intervals.ap_intervals(preds, refs, n_resamples=50)["ap"]
