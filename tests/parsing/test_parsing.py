"""Tests for vieval_runner.parsing: every format, real-world mess, references, fuzz."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time

import pytest

from vieval_runner.parsing import (
    FORMATS,
    PARSER_VERSION,
    ParseContext,
    parse_answer,
    parse_grounding,
    parse_record,
    result_to_json,
)
from vieval_runner.records import PARSE_STATUSES, Box, ParseResult

W, H = 640, 480


def boxes(text: str, fmt: str, **kw) -> tuple[str, list[list[float]], list[str]]:
    kw.setdefault("image_size", (W, H))
    r = parse_grounding(text, fmt, **kw)
    return (
        r.status,
        [[round(v, 4) for v in b.as_list()] for b in r.boxes],
        [b.label for b in r.boxes],
    )


def assert_valid(r: ParseResult, w: float = W, h: float = H) -> None:
    assert r.status in PARSE_STATUSES
    for b in r.boxes:
        assert isinstance(b, Box) and isinstance(b.label, str) and b.score is None
        assert all(math.isfinite(v) for v in b.as_list())
        assert 0 <= b.x1 <= b.x2 <= w and 0 <= b.y1 <= b.y2 <= h


# ------------------------------------------------------------------ each format, clean output
def test_qwen2_vl_boxes_and_previous_ref():
    t = (
        "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
        "<|box_start|>(0,0),(1000,1000)<|box_end|><|im_end|>"
    )
    assert boxes(t, "qwen2_vl") == (
        "ok",
        [[64, 96, 192, 192], [0, 0, 640, 480]],
        ["the dog", "the dog"],
    )
    no_ref = "<|box_start|>(500,500),(600,600)<|box_end|>"
    assert boxes(no_ref, "qwen2_vl", default_label="cat")[2] == ["cat"]


def test_qwen2_vl_decoded_without_special_tokens():
    # skip_special_tokens=True drops the tags; the coordinate pairs are still read
    assert boxes("the dog(100,200),(300,400)", "qwen2_vl", default_label="dog") == (
        "ok",
        [[64, 96, 192, 192]],
        ["dog"],
    )


def test_qwen25_json_scales_from_model_input_to_original():
    t = '```json\n[\n  {"bbox_2d": [14, 28, 140, 280], "label": "dog"}\n]\n```'
    st, bx, lb = boxes(t, "qwen25_vl_json", image_size=(1000, 2000), input_size=(280, 560))
    assert (st, bx, lb) == ("ok", [[50, 100, 500, 1000]], ["dog"])
    # no input_size: coordinates are taken as original pixels
    assert boxes(t, "qwen25_vl_json")[1] == [[14, 28, 140, 280]]


def test_qwen25_scaling_matches_the_qwen_processor_resize():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ih, iw = smart_resize(480, 640, factor=28, min_pixels=56 * 56, max_pixels=448 * 448)
    assert (iw, ih) != (640, 480)  # the resize really changes the frame
    truth = [64.0, 96.0, 192.0, 192.0]
    in_model = [truth[0] * iw / 640, truth[1] * ih / 480, truth[2] * iw / 640, truth[3] * ih / 480]
    t = json.dumps([{"bbox_2d": in_model, "label": "x"}])
    r = parse_grounding(t, "qwen25_vl_json", (640, 480), input_size=(iw, ih))
    assert r.boxes[0].as_list() == pytest.approx(truth)


def test_qwen3_json_relative_1000():
    t = 'Here you go:\n```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "猫"}]\n```\nDone.'
    assert boxes(t, "qwen3_vl_json") == ("ok", [[64, 96, 192, 192]], ["猫"])


def test_paligemma_y_first_1024_bins():
    t = "<loc0256><loc0128><loc0768><loc0896> cat ; <loc0000><loc0512><loc1024><loc1024> dog<eos>"
    st, bx, lb = boxes(t, "paligemma_loc")
    assert st == "ok" and lb == ["cat", "dog"]
    # y1 = 256/1024*480, x1 = 128/1024*640, y2 = 768/1024*480, x2 = 896/1024*640
    assert bx == [[80, 120, 560, 360], [320, 0, 640, 480]]


def test_paligemma_segmentation_tokens_are_ignored():
    t = "<loc0000><loc0000><loc0512><loc0512><seg012><seg055> cat"
    assert boxes(t, "paligemma_loc") == ("ok", [[0, 0, 320, 240]], ["cat"])


def test_florence2_bin_centre_and_label_before_quads():
    t = "</s><s>a dog<loc_100><loc_200><loc_300><loc_400><loc_0><loc_0><loc_999><loc_999>cat<loc_10><loc_10><loc_20><loc_20></s>"
    st, bx, lb = boxes(t, "florence2_loc")
    assert st == "ok" and lb == ["a dog", "a dog", "cat"]
    assert bx[0] == pytest.approx([100.5 * 0.64, 200.5 * 0.48, 300.5 * 0.64, 400.5 * 0.48])
    assert bx[1] == pytest.approx([0.5 * 0.64, 0.5 * 0.48, 999.5 * 0.64, 999.5 * 0.48])


def test_internvl_several_boxes_in_one_tag():
    t = "<ref>dog</ref><box>[[100, 200, 300, 400], [500, 600, 700, 800]]</box>"
    assert boxes(t, "internvl") == (
        "ok",
        [[64, 96, 192, 192], [320, 288, 448, 384]],
        ["dog", "dog"],
    )


def test_kosmos2_patch_grid():
    t = "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
    st, bx, lb = boxes(t, "kosmos2")
    assert st == "ok" and lb == ["a snowman"]
    assert bx[0] == pytest.approx([0.390625 * W, 0.046875 * H, 0.984375 * W, 0.828125 * H])


@pytest.mark.parametrize(
    ("coords", "text", "expected"),
    [
        (None, "[10, 20, 30, 40]", [10, 20, 30, 40]),
        ("pixel", "(10, 20, 30, 40)", [10, 20, 30, 40]),
        ("relative_1000", "[100, 200, 300, 400]", [64, 96, 192, 192]),
        ("normalized_1", "[0.1, 0.2, 0.3, 0.4]", [64, 96, 192, 192]),
        ("percent", "[10, 20, 30, 40]", [64, 96, 192, 192]),
        ("relative_1024", "[512, 512, 1024, 1024]", [320, 240, 640, 480]),
    ],
)
def test_plain_xyxy_coordinate_systems(coords, text, expected):
    st, bx, lb = boxes(text, "plain_xyxy", coords=coords, default_label="p")
    assert (st, lb) == ("ok", ["p"])
    assert bx[0] == pytest.approx(expected)


# ------------------------------------------------------------------ references
@pytest.fixture(scope="module")
def florence_post():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>"))
    )
    return Florence2PostProcessor({}, tok)


@pytest.mark.parametrize(
    "text",
    [
        "a dog<loc_100><loc_200><loc_300><loc_400>a cat<loc_0><loc_0><loc_999><loc_999>",
        "</s><s>people<loc_12><loc_34><loc_560><loc_780><loc_600><loc_10><loc_990><loc_500></s>",
    ],
)
def test_florence2_equals_transformers_postprocessor(florence_post, text):
    ref = florence_post.parse_description_with_bboxes_from_text_and_spans(text, image_size=(W, H))
    got = parse_grounding(text, "florence2_loc", (W, H))
    assert got.status == "ok"
    assert [b.label for b in got.boxes] == [r["cat_name"] for r in ref]
    # transformers truncates the bin centre to int (``.int()``); we keep the float centre
    for b, r in zip(got.boxes, ref, strict=True):
        assert [int(v) for v in b.as_list()] == r["bbox"]


def test_kosmos2_equals_transformers_extraction():
    from transformers.models.kosmos2.processing_kosmos2 import (
        clean_text_and_extract_entities_with_bboxes,
    )

    text = (
        "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
        "</object> warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911>"
        "</delimiter_of_multi_objects/><patch_index_0100><patch_index_0100></object>."
    )
    _, entities = clean_text_and_extract_entities_with_bboxes(text)
    ref = [
        (name, [c * s for c, s in zip(bb, (W, H, W, H), strict=True)])
        for name, _, bbs in entities
        for bb in bbs
    ]
    got = parse_grounding(text, "kosmos2", (W, H))
    assert got.status == "ok"
    assert [b.label for b in got.boxes] == [n for n, _ in ref]
    for b, (_, bb) in zip(got.boxes, ref, strict=True):
        assert b.as_list() == pytest.approx(bb)


def test_qwen2_vl_through_a_real_tokenizer_decode():
    # Special tokens survive decode(skip_special_tokens=False), however the tokenizer spaces them.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|im_end|>",
    ]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        ["the dog (123,456),(789,1000) a cat"] * 5,
        trainers.BpeTrainer(special_tokens=specials, vocab_size=300),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>")
    out = "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(123,456),(789,1000)<|box_end|><|im_end|>"
    decoded = tok.decode(tok(out)["input_ids"], skip_special_tokens=False)
    st, bx, lb = boxes(decoded, "qwen2_vl")
    assert (st, lb) == ("ok", ["the dog"])
    assert bx[0] == pytest.approx([123 * 0.64, 456 * 0.48, 789 * 0.64, 480])


# ------------------------------------------------------------------ real-world mess
def test_prose_and_fence_around_json():
    t = (
        "Sure! The objects are:\n```json\n[\n"
        '  {"bbox_2d": [100, 100, 200, 200], "label": "cup"},\n'
        '  {"bbox_2d": [300, 300, 400, 400], "label": "plate"}\n]\n```\nLet me know if more.'
    )
    st, bx, lb = boxes(t, "qwen3_vl_json")
    assert st == "ok" and lb == ["cup", "plate"] and len(bx) == 2


def test_truncated_json_keeps_the_closed_entries():
    t = '```json\n[\n  {"bbox_2d": [100, 100, 200, 200], "label": "cup"},\n  {"bbox_2d": [300, 30'
    assert boxes(t, "qwen3_vl_json") == ("truncated", [[64, 48, 128, 96]], ["cup"])
    cut_in_label = (
        '[{"bbox_2d": [100, 100, 200, 200], "label": "cup"}, {"bbox_2d": [1, 2, 3, 4], "label": "pl'
    )
    assert boxes(cut_in_label, "qwen3_vl_json")[:2] == ("truncated", [[64, 48, 128, 96]])


@pytest.mark.parametrize(
    ("fmt", "text", "n"),
    [
        (
            "qwen2_vl",
            "<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|><|box_start|>(5,6),(7",
            1,
        ),
        ("qwen2_vl", "<|object_ref_start|>a dog", 0),
        ("paligemma_loc", "<loc0001><loc0002><loc0003><loc0004> a ; <loc0005><loc0006>", 1),
        ("florence2_loc", "dog<loc_1><loc_2><loc_3><loc_4>cat<loc_5><loc_6><loc_7>", 1),
        ("internvl", "<ref>a</ref><box>[[1, 2, 3, 4], [5, 6, 7", 1),
        (
            "kosmos2",
            "<phrase>a</phrase><object><patch_index_0001><patch_index_0040></delimiter_of_multi_objects/><patch_index_0003>",
            1,
        ),
        ("plain_xyxy", "[1, 2, 3, 4] and [5, 6,", 1),
    ],
)
def test_truncated_every_format(fmt, text, n):
    r = parse_grounding(text, fmt, (W, H))
    assert r.status == "truncated" and len(r.boxes) == n
    assert_valid(r)


def test_duplicates_are_kept_as_a_repetition_loop_shows():
    one = '{"bbox_2d": [10, 10, 50, 50], "label": "dog"}'
    t = "[" + ", ".join([one] * 5) + "]"
    st, bx, _ = boxes(t, "qwen25_vl_json")
    assert st == "ok" and bx == [[10, 10, 50, 50]] * 5


def test_swapped_corners_are_ordered():
    assert boxes('[{"bbox_2d": [300, 400, 100, 200]}]', "qwen3_vl_json", default_label="x") == (
        "ok",
        [[64, 96, 192, 192]],
        ["x"],
    )
    assert boxes("<loc0768><loc0896><loc0256><loc0128> cat", "paligemma_loc")[1] == [
        [80, 120, 560, 360]
    ]


def test_out_of_range_negative_and_huge_are_clamped():
    st, bx, _ = boxes("<|box_start|>(-50,100),(1200,99999999999)<|box_end|>", "qwen2_vl")
    assert (st, bx) == ("out_of_range", [[0, 48, 640, 480]])
    st, bx, _ = boxes('[{"bbox_2d": [-10, -10, 700, 500]}]', "qwen25_vl_json")
    assert (st, bx) == ("out_of_range", [[0, 0, 640, 480]])
    st, bx, _ = boxes("<loc1500><loc0000><loc2000><loc0512> cat", "paligemma_loc")
    assert (st, bx) == ("out_of_range", [[0, 480, 320, 480]])  # flat on the bottom edge: kept
    huge = "[" + "9" * 400 + ", 0, 10, 10]"  # an int too big for a float
    st, bx, _ = boxes(huge, "qwen25_vl_json")
    assert (st, bx) == ("out_of_range", [[10, 0, 640, 10]])


def test_nan_is_malformed_and_inf_is_clamped():
    r = parse_grounding(
        '[{"bbox_2d": [NaN, 1, 2, 3]}, {"bbox_2d": [1, 1, 5, 5]}]', "qwen25_vl_json", (W, H)
    )
    assert r.status == "malformed" and [b.as_list() for b in r.boxes] == [[1, 1, 5, 5]]
    r = parse_grounding('[{"bbox_2d": [1, 1, Infinity, 1e999]}]', "qwen25_vl_json", (W, H))
    assert r.status == "out_of_range" and r.boxes[0].as_list() == [1, 1, W, H]
    r = parse_grounding("[nan, 1, 2, 3]", "plain_xyxy", (W, H))
    assert r.status == "malformed" and not r.boxes


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("text", ["", "   \n", "<|im_end|>", "</s>", "<eos>garbage after eos"])
def test_empty_outputs(fmt, text):
    assert parse_grounding(text, fmt, (W, H)) == ParseResult(status="empty")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_no_structure_is_malformed(fmt):
    r = parse_grounding("I think there is a dog on the left side of the picture.", fmt, (W, H))
    assert r == ParseResult(status="malformed")


def test_explicit_empty_list_is_empty():
    assert parse_grounding("```json\n[]\n```", "qwen25_vl_json", (W, H)).status == "empty"
    assert parse_grounding("[]", "plain_xyxy", (W, H)).status == "empty"


def test_broken_entries_are_malformed_but_good_ones_kept():
    t = "<|box_start|>(1,2),(3,4)<|box_end|><|box_start|>(5,6),(7)<|box_end|>"
    r = parse_grounding(t, "qwen2_vl", (1000, 1000))
    assert r.status == "malformed" and len(r.boxes) == 1
    t = '[{"bbox_2d": [1, 2, 3]}, {"bbox_2d": [1, 2, 3, 4]}, {"label": "x"}]'
    r = parse_grounding(t, "qwen25_vl_json", (W, H))
    assert r.status == "malformed" and len(r.boxes) == 1
    r = parse_grounding(
        "<loc0001><loc0002><loc0003> a ; <loc0001><loc0002><loc0003><loc0004> b",
        "paligemma_loc",
        (W, H),
    )
    assert r.status == "malformed" and [b.label for b in r.boxes] == ["b"]


def test_json_variants():
    ctx = {"image_size": (W, H), "default_label": "d"}
    single = 'The answer is {"bbox_2d": [1, 2, 3, 4], "label": "a"}.'
    assert boxes(single, "qwen25_vl_json", **ctx) == ("ok", [[1, 2, 3, 4]], ["a"])
    # "bbox" is no Qwen key (COCO writes [x, y, w, h] under it): refused, not guessed
    other = 'The answer is {"bbox": [1, 2, 3, 4], "label": "a"}.'
    assert boxes(other, "qwen25_vl_json", **ctx) == ("malformed", [], [])
    lenient = "[{'bbox_2d': [1, 2, 3, 4], 'label': 'a'},]"
    assert boxes(lenient, "qwen25_vl_json", **ctx) == ("ok", [[1, 2, 3, 4]], ["a"])
    lines = '{"bbox_2d": [1, 2, 3, 4], "label": "a"}\n{"bbox_2d": [5, 6, 7, 8], "label": "b"}'
    assert boxes(lines, "qwen25_vl_json", **ctx)[2] == ["a", "b"]
    points = '[{"point_2d": [5, 5], "label": "p"}, {"bbox_2d": [1, 2, 3, 4]}]'
    assert boxes(points, "qwen25_vl_json", **ctx) == ("ok", [[1, 2, 3, 4]], ["d"])
    nested = '{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "a"}]}'
    assert boxes(nested, "qwen25_vl_json", **ctx)[1] == [[1, 2, 3, 4]]
    bare = "[[1, 2, 3, 4], [5, 6, 7, 8]]"
    assert boxes(bare, "qwen25_vl_json", **ctx) == ("ok", [[1, 2, 3, 4], [5, 6, 7, 8]], ["d", "d"])
    pairs = '[{"bbox_2d": [[1, 2], [3, 4]]}]'
    assert boxes(pairs, "qwen25_vl_json", **ctx)[1] == [[1, 2, 3, 4]]
    footnote = 'See [1]. [{"bbox_2d": [1, 2, 3, 4], "label": "a"}]'
    assert boxes(footnote, "qwen25_vl_json", **ctx) == ("ok", [[1, 2, 3, 4]], ["a"])
    strings = '[{"bbox_2d": ["1", "2", "3", "4"], "label": 7}]'
    assert boxes(strings, "qwen25_vl_json", **ctx) == ("ok", [[1, 2, 3, 4]], ["7"])


def test_special_token_residue_around_answer():
    t = "<|im_start|>assistant\n<|object_ref_start|>cup<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|><|im_end|><|endoftext|><|endoftext|>"
    assert boxes(t, "qwen2_vl") == ("ok", [[0, 0, 320, 240]], ["cup"])
    # text after the first end-of-turn token is not the answer
    t = '[{"bbox_2d": [1, 2, 3, 4]}]<end_of_turn>[{"bbox_2d": [5, 6, 7, 8]}]'
    assert boxes(t, "qwen25_vl_json")[1] == [[1, 2, 3, 4]]


def test_unicode_labels_kept():
    t = "<ref>красная чашка ☕</ref><box>[[0, 0, 500, 500]]</box>"
    assert boxes(t, "internvl")[2] == ["красная чашка ☕"]
    assert boxes("赤いカップ<loc_0><loc_0><loc_499><loc_499>", "florence2_loc")[2] == ["赤いカップ"]


def test_zero_area_box_kept():
    assert boxes("[10, 10, 10, 50]", "plain_xyxy") == ("ok", [[10, 10, 10, 50]], [""])


# ------------------------------------------------------------------ answers, records, API
@pytest.mark.parametrize(
    ("raw", "answer", "status"),
    [
        (" Paris<|im_end|>", "Paris", "ok"),
        ('"two dogs"</s><pad><pad>', "two dogs", "ok"),
        ("<start_of_turn>model\n\u201cyes\u201d<end_of_turn>", "yes", "ok"),
        ("'it's red'", "it's red", "ok"),
        ("<|im_end|>", "", "empty"),
        ("  \n ", "", "empty"),
        ('"unbalanced', '"unbalanced', "ok"),
    ],
)
def test_parse_answer(raw, answer, status):
    r = parse_answer(raw)
    assert (r.answer, r.status, r.boxes) == (answer, status, [])


def test_result_to_json_rounds_to_two_decimals():
    r = ParseResult("ok", [Box(1.23456, 2, 3.005, 4.999, "a")])
    out = result_to_json(r)
    assert out == {"status": "ok", "boxes": [{"label": "a", "box": [1.23, 2, 3.0, 5.0]}]}
    json.dumps(out)


def test_parse_record_good_and_bad():
    good = {
        "text": "<loc0000><loc0000><loc0512><loc0512> cat",
        "format": "paligemma_loc",
        "image_size": [W, H],
        "input_size": None,
    }
    assert parse_record(good) == {
        "status": "ok",
        "boxes": [{"label": "cat", "box": [0.0, 0.0, 320.0, 240.0]}],
    }
    scaled = {
        "text": "[10, 10, 20, 20]",
        "format": "qwen25_vl_json",
        "image_size": [200, 200],
        "input_size": [100, 100],
    }
    assert parse_record(scaled)["boxes"][0]["box"] == [20.0, 20.0, 40.0, 40.0]
    bad = [
        ("not a dict", "JSON object"),
        ({"format": "qwen2_vl", "image_size": [1, 1]}, "text"),
        ({"text": "", "image_size": [1, 1]}, "format"),
        ({"text": "", "format": "qwen2_vl"}, "image_size"),
        ({"text": "", "format": "qwen9", "image_size": [1, 1]}, "qwen2_vl"),
        ({"text": "", "format": "qwen2_vl", "image_size": [0, 5]}, "image_size"),
        ({"text": "", "format": "qwen2_vl", "image_size": [5, 5], "input_size": "x"}, "input_size"),
        ({"text": 5, "format": "qwen2_vl", "image_size": [5, 5]}, "text"),
        ({"text": "", "format": "plain_xyxy", "image_size": [5, 5], "coords": "miles"}, "coords"),
    ]
    for rec, word in bad:
        out = parse_record(rec)
        assert out["status"] == "error" and word in out["error"], (rec, out)


def test_config_errors_raise():
    with pytest.raises(ValueError, match="qwen25_vl_json"):
        parse_grounding("x", "qwen4", (W, H))
    with pytest.raises(ValueError, match="image_size"):
        ParseContext(image_size=(0, 10))
    # every kind of bad size is refused, the tuples of plain numbers checked quickly included
    for size in [(float("nan"), 10), (10, float("inf")), (-1, 10), (True, 10), (10**400, 5),
                 (None, 5), (10,), [10, 0]]:  # fmt: skip
        with pytest.raises(ValueError, match="image_size"):
            ParseContext(image_size=size)
    for size, kept in [((640, 480), (640, 480)), ([640, 480.5], (640, 480.5)),
                       ((2**60, 1e300), (2**60, 1e300))]:  # fmt: skip
        assert ParseContext(image_size=size).image_size == kept
    with pytest.raises(ValueError, match="coords"):
        parse_grounding("x", "plain_xyxy", (W, H), coords="feet")


def test_version_and_registry():
    assert isinstance(PARSER_VERSION, str) and PARSER_VERSION
    assert set(FORMATS) >= {
        "qwen2_vl", "qwen25_vl_json", "qwen3_vl_json", "paligemma_loc",
        "florence2_loc", "internvl", "plain_xyxy", "kosmos2",
    }  # fmt: skip


def test_import_pulls_no_model_libraries():
    code = (
        "import sys, vieval_runner.parsing as p; "
        "p.parse_grounding('[1,2,3,4]', 'plain_xyxy', (9, 9)); "
        "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ fuzz
SAMPLES = {
    "qwen2_vl": "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|><|im_end|>",
    "qwen25_vl_json": '```json\n[{"bbox_2d": [10, 20, 300, 400], "label": "dog"}, {"bbox_2d": [1, 2, 3, 4]}]\n```',
    "qwen3_vl_json": '[{"bbox_2d": [100, 200, 300, 400], "label": "cat"}]',
    "paligemma_loc": "<loc0256><loc0128><loc0768><loc0896> cat ; <loc0000><loc0000><loc1023><loc1023> dog",
    "florence2_loc": "</s><s>a dog<loc_100><loc_200><loc_300><loc_400>cat<loc_1><loc_2><loc_3><loc_4></s>",
    "internvl": "<ref>dog</ref><box>[[100, 200, 300, 400], [500, 600, 700, 800]]</box>",
    "kosmos2": "<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object>",
    "plain_xyxy": "dog [10, 20, 30, 40], cat (1.5, 2, 3e2, 4)",
    "florence2_ocr": "</s><s>OPEN<loc_10><loc_20><loc_90><loc_20><loc_90><loc_60><loc_10><loc_60></s>",
    "gemini_json": '```json\n[{"box_2d": [200, 100, 400, 300], "label": "cat"}]\n```',
    "deepseek_vl2": "<|ref|>dog<|/ref|><|det|>[[100, 200, 300, 400], [5, 6, 7, 8]]<|/det|>",
    "moondream": '{"objects": [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.5, "y_max": 0.9}]}',
}
PIECES = [*'[]{}",()<>-;\n', "1e999", "NaN", "0", "9999", "<|box_end|>", "</box>", "<loc_7>"]


def _mutate(rng: random.Random, s: str) -> str:
    for _ in range(rng.randint(1, 6)):
        i = rng.randint(0, len(s))
        op = rng.randrange(5)
        if op == 0:
            s = s[:i]  # truncation
        elif op == 1:
            s = s[:i] + rng.choice(PIECES) + s[i:]
        elif op == 2:
            s = s[:i] + s[i + rng.randint(1, 5) :]
        elif op == 3:
            j = rng.randint(0, len(s))
            s = s[:i] + s[min(i, j) : max(i, j)] + s[i:]  # duplicate a segment
        else:
            s = s[:i] + chr(rng.randint(0, 0x2FFF)) + s[i:]
    return s


def test_fuzz_never_raises_and_boxes_stay_in_image():
    rng = random.Random(1234)
    ctx = ParseContext(
        image_size=(W, H), input_size=(320, 240), coords="relative_1000", default_label="d"
    )
    for fmt, parser in FORMATS.items():  # call the parsers directly: no safety net in between
        for k in range(400):
            if k % 4 == 0:
                text = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))).decode(
                    "utf-8", "replace"
                )
            else:
                text = _mutate(rng, SAMPLES[fmt] if k % 2 else rng.choice(list(SAMPLES.values())))
            r = parser(text, ctx)
            assert isinstance(r, ParseResult), (fmt, text)
            assert_valid(r)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_pathological_inputs_are_fast(fmt):
    ctx = ParseContext(image_size=(W, H))
    for text in ["[" * 5000, "{" * 5000, "[1," * 3000, '"' * 5000, "<loc0001>" * 3000, "(" * 5000]:
        t0 = time.perf_counter()
        assert_valid(FORMATS[fmt](text, ctx))
        assert time.perf_counter() - t0 < 2.0, (fmt, text[:20])


# ---------------------------------------------------------------- box spans (per-box scores)


def spans(text: str, fmt: str, **kw) -> tuple[str, list[str]]:
    """Status and, per box, the raw text its span covers (spans index the exact input)."""
    kw.setdefault("image_size", (W, H))
    r = parse_grounding(text, fmt, **kw)
    out = []
    for b in r.boxes:
        assert b.span is not None, (fmt, text, b)
        start, end = b.span
        assert 0 <= start < end <= len(text)
        out.append(text[start:end])
    return r.status, out


SPAN_CASES = {
    "florence2_ocr": (
        "</s><s>OPEN<loc_10><loc_20><loc_90><loc_20><loc_90><loc_60><loc_10><loc_60>"
        "EXIT<loc_1><loc_2><loc_3><loc_2><loc_3><loc_4><loc_1><loc_4></s>",
        [
            "OPEN<loc_10><loc_20><loc_90><loc_20><loc_90><loc_60><loc_10><loc_60>",
            "EXIT<loc_1><loc_2><loc_3><loc_2><loc_3><loc_4><loc_1><loc_4>",
        ],
    ),
    "gemini_json": (
        '```json\n[{"box_2d": [20, 10, 400, 300], "label": "dog"}, {"box_2d": [1, 2, 3, 4]}]\n```',
        ['{"box_2d": [20, 10, 400, 300], "label": "dog"}', '{"box_2d": [1, 2, 3, 4]}'],
    ),
    "deepseek_vl2": (
        "<|ref|>dog<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|> and "
        "<|ref|>cat<|/ref|><|det|>[[30, 40, 50, 60], [70, 80, 90, 99]]<|/det|>",
        [
            "<|ref|>dog<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|>",
            "<|ref|>cat<|/ref|><|det|>[[30, 40, 50, 60]",
            ", [70, 80, 90, 99]]<|/det|>",
        ],
    ),
    "moondream": (
        '{"objects": [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.5, "y_max": 0.9}, '
        '{"x_min": 0, "y_min": 0, "x_max": 1, "y_max": 1}]}',
        [
            '{"x_min": 0.1, "y_min": 0.2, "x_max": 0.5, "y_max": 0.9}',
            '{"x_min": 0, "y_min": 0, "x_max": 1, "y_max": 1}',
        ],
    ),
    "qwen2_vl": (
        "<|im_start|>assistant\n<|object_ref_start|>dog<|object_ref_end|>"
        "<|box_start|>(10,20),(300,400)<|box_end|> and <|object_ref_start|>cat<|object_ref_end|>"
        "<|box_start|>(1,2),(30,40),(50,60),(70,80)<|box_end|><|im_end|>",
        [
            "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>",
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(30,40)",
            ",(50,60),(70,80)<|box_end|>",
        ],
    ),
    "qwen25_vl_json": (
        'Here are the boxes:\n```json\n[\n  {"bbox_2d": [10, 20, 300, 400], "label": "dog"},\n'
        '  {"bbox_2d": [30, 40, 50, 60], "label": "cat"}\n]\n```\nDone.',
        [
            '{"bbox_2d": [10, 20, 300, 400], "label": "dog"}',
            '{"bbox_2d": [30, 40, 50, 60], "label": "cat"}',
        ],
    ),
    "qwen3_vl_json": (
        "Sure. [{'bbox_2d': [10, 20, 300, 400], 'label': \"dog's toy\"},"
        " {'label': 'cat', 'bbox_2d': [[30, 40], [50, 60]]},]",
        [
            "{'bbox_2d': [10, 20, 300, 400], 'label': \"dog's toy\"}",
            "{'label': 'cat', 'bbox_2d': [[30, 40], [50, 60]]}",
        ],
    ),
    "paligemma_loc": (
        "<bos><loc0010><loc0020><loc0300><loc0400> dog ; "
        "<loc0030><loc0040><loc0050><loc0060><seg012><loc0070><loc0080><loc0090><loc0100> cat"
        "<eos>",
        [
            "<loc0010><loc0020><loc0300><loc0400> dog",
            "<loc0030><loc0040><loc0050><loc0060>",
            "<loc0070><loc0080><loc0090><loc0100> cat",
        ],
    ),
    "florence2_loc": (
        "</s><s>dog<loc_10><loc_20><loc_300><loc_400>cat<loc_30><loc_40><loc_50><loc_60>"
        "<loc_70><loc_80><loc_90><loc_99></s>",
        [
            "dog<loc_10><loc_20><loc_300><loc_400>",
            "cat<loc_30><loc_40><loc_50><loc_60>",
            "<loc_70><loc_80><loc_90><loc_99>",
        ],
    ),
    "internvl": (
        "The <ref>dog</ref><box>[[10, 20, 300, 400]]</box> and "
        "<ref>cat</ref><box>[[30, 40, 50, 60], [70, 80, 90, 99]]</box>.",
        [
            "<ref>dog</ref><box>[[10, 20, 300, 400]]</box>",
            "<ref>cat</ref><box>[[30, 40, 50, 60]",
            ", [70, 80, 90, 99]]</box>",
        ],
    ),
    "kosmos2": (
        "<grounding> A <phrase>dog</phrase><object><patch_index_0001><patch_index_0100></object>"
        " near <phrase>cats</phrase><object><patch_index_0002><patch_index_0200>"
        "</delimiter_of_multi_objects/><patch_index_0003><patch_index_0300></object>.",
        [
            "<phrase>dog</phrase><object><patch_index_0001><patch_index_0100></object>",
            "<phrase>cats</phrase><object><patch_index_0002><patch_index_0200>",
            "</delimiter_of_multi_objects/><patch_index_0003><patch_index_0300></object>",
        ],
    ),
    "plain_xyxy": (
        "<pad><pad>  The dog is at [10, 20, 300, 400] and the cat at (30, 40, 50, 60).",
        ["[10, 20, 300, 400]", "(30, 40, 50, 60)"],
    ),
}


@pytest.mark.parametrize("fmt", sorted(SPAN_CASES))
def test_each_box_knows_its_span_in_the_raw_text(fmt):
    """Two or more boxes amid prose, residue and fences: each box's span is the structure it
    was read from, in positions of the exact text the parser was given."""
    text, want = SPAN_CASES[fmt]
    assert set(SPAN_CASES) == set(FORMATS)
    kw = {"input_size": (W, H)} if fmt == "qwen25_vl_json" else {}
    status, got = spans(text, fmt, **kw)
    assert status == "ok", (fmt, status)
    assert got == want


def test_spans_of_a_cut_off_json_list_and_of_duplicates():
    """A truncated list keeps the spans of the entries that closed; identical boxes (kept, not
    deduplicated) each keep their own span; swapped corners and clamping keep the span."""
    text = (
        '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "a"}, '
        '{"bbox_2d": [900, 900, 10, 2000], "label": "b"}, {"bbox_2d": [5, 6'
    )
    status, got = spans(text, "qwen3_vl_json")
    assert status == "truncated"
    assert got == [
        '{"bbox_2d": [1, 2, 3, 4], "label": "a"}',
        '{"bbox_2d": [1, 2, 3, 4], "label": "a"}',
        '{"bbox_2d": [900, 900, 10, 2000], "label": "b"}',
    ]
    r = parse_grounding(text, "qwen3_vl_json", (W, H))
    assert r.boxes[0] == r.boxes[1] and r.boxes[0].span != r.boxes[1].span  # span: no equality
    assert r.boxes[2].as_list() == pytest.approx([0.01 * W, 0.9 * H, 0.9 * W, H])
    assert Box(1, 2, 3, 4, span=(0, 5)).to_row() == Box(1, 2, 3, 4).to_row()  # not stored


def test_spans_survive_leading_residue_and_whitespace():
    """clean-up removes pads and role headers before parsing; spans still index the raw text."""
    text = '<pad><|im_start|>assistant\n  <pad>[{"bbox_2d": [1, 2, 3, 4]}]  <|im_end|><pad>'
    status, got = spans(text, "qwen3_vl_json")
    assert (status, got) == ("ok", ['{"bbox_2d": [1, 2, 3, 4]}'])
    cut = "<|object_ref_start|>x<|object_ref_end|><|box_start|>(1,2),(3,4)"
    status, got = spans(cut, "qwen2_vl")  # cut before <|box_end|>: the box is whole
    assert got == [cut]


def test_fuzzed_spans_stay_inside_the_text():
    rng = random.Random(7)
    pieces = [t for text, _ in SPAN_CASES.values() for t in (text[:40], text[40:], text)]
    pieces += ["<pad>", "```json\n", "```", "[", "{", ",", " ", "\u00e9", "<|im_end|>"]
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        for fmt in FORMATS:
            r = parse_grounding(text, fmt, (W, H), input_size=(W, H))
            for b in r.boxes:
                assert b.span is not None, (fmt, text)
                assert 0 <= b.span[0] < b.span[1] <= len(text), (fmt, text, b.span)
