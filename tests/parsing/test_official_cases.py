"""Parser cases checked against each family's own post-processing or evaluator.

Where the family's code ships in an installed package (transformers' Florence-2 and Kosmos-2
processors) it runs here as the oracle; otherwise the file and function the expected values
come from are cited beside them.
"""

from __future__ import annotations

import json
import re

import pytest

from vieval_runner.parsing import FLORENCE2_BANNED_GROUNDING_TOKENS, parse_grounding

W, H = 640, 480


def got(text: str, fmt: str, **kw) -> tuple[str, list[list[float]], list[str]]:
    r = parse_grounding(text, fmt, kw.pop("image_size", (W, H)), **kw)
    return r.status, [b.as_list() for b in r.boxes], [b.label for b in r.boxes]


# ------------------------------------------------------------------ InternVL
def internvl_refcoco_box(answer: str, w: float, h: float) -> list[float]:
    """InternVL ``internvl_chat/eval/refcoco/evaluate_grounding.py``, ``evaluate_chat_model``:
    ``PATTERN = re.compile(r'\\[*\\[(.*?),(.*?),(.*?),(.*?)\\]\\]*')``, the first match,
    divided by 1000 (when its sum is >= 4), x times the image width, y times its height."""
    found = re.findall(r"\[*\[(.*?),(.*?),(.*?),(.*?)\]\]*", answer)
    box = [float(v) for v in found[0]]
    if sum(box) >= 4:
        box = [v / 1000 for v in box]
    return [box[0] * w, box[1] * h, box[2] * w, box[3] * h]


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("[[183, 346, 524, 988]]", "the man"),  # InternVL chat() output: no tags left
        ("the man on the left[[183, 346, 524, 988]]", "the man on the left"),
        ("[183, 346, 524, 988]", "the man"),
    ],
)
def test_internvl_tagless_output_equals_its_refcoco_evaluator(answer, label):
    status, boxes, labels = got(answer, "internvl", default_label="the man")
    assert status == "ok" and labels == [label]
    assert boxes[0] == pytest.approx(internvl_refcoco_box(answer, W, H))


def test_internvl_tagless_several_boxes_and_a_cut():
    status, boxes, labels = got("cars[[0, 0, 500, 500], [500, 500, 1000, 1000]]", "internvl")
    assert status == "ok" and labels == ["cars", "cars"]
    assert boxes == [[0, 0, 320, 240], [320, 240, 640, 480]]
    assert got("cars[[0, 0, 500, 5", "internvl", truncated=True)[0] == "truncated"


def test_internvl_scene_graph_relations_do_not_repeat_boxes():
    # The caption format of OpenGVLab's All-Seeing-v2 scene-graph data (its visualisation
    # script's example): each <pred> is followed by the subject's and the object's boxes,
    # which were already given after their own <ref>.
    text = (
        "In the image, a tall red <ref>bus</ref><box>[[290, 202, 835, 851]]</box> is "
        "<pred>driving on</pred><box>[[290, 202, 835, 851]]</box><box>[[0, 604, 984, 999]]</box>"
        " a <ref>road</ref><box>[[0, 604, 984, 999]]</box> through a busy intersection."
    )
    status, boxes, labels = got(text, "internvl")
    assert status == "ok" and labels == ["bus", "road"]
    assert boxes[0] == pytest.approx([290 * 0.64, 202 * 0.48, 835 * 0.64, 851 * 0.48])


# ------------------------------------------------------------------ Florence-2 (transformers)
@pytest.fixture(scope="module")
def florence_processor():
    """The tiny Florence2Processor with the released checkpoints' post-processor config."""
    from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

    from vieval_runner.testing.tiny_families import florence2

    proc = florence2.processor()
    config = {
        "phrase_grounding": {"banned_grounding_tokens": sorted(FLORENCE2_BANNED_GROUNDING_TOKENS)},
        "ocr": {},
    }
    proc.post_processor = Florence2PostProcessor(config, proc.tokenizer)
    return proc


@pytest.mark.parametrize(
    "text",
    [
        "</s><s>the image<loc_0><loc_0><loc_999><loc_999>a dog<loc_100><loc_200><loc_300><loc_400></s>",
        "</s><s>it<loc_5><loc_6><loc_700><loc_800>cat<loc_10><loc_20><loc_30><loc_40></s>",
        "</s><s>the image<loc_0><loc_0><loc_999><loc_999></s>",
    ],
)
def test_florence2_phrase_grounding_equals_transformers(florence_processor, text):
    want = florence_processor.post_process_generation(
        text, task="<CAPTION_TO_PHRASE_GROUNDING>", image_size=(W, H)
    )["<CAPTION_TO_PHRASE_GROUNDING>"]
    status, boxes, labels = got(text, "florence2_loc")
    assert labels == want["labels"]
    # transformers truncates the bin centre to int; we keep the float centre
    assert [[int(v) for v in b] for b in boxes] == want["bboxes"]
    assert status == ("ok" if want["bboxes"] else "empty")


def test_florence2_banned_list_is_the_released_one():
    # transformers models/florence2/convert_florence2_original_pytorch_to_hf.py,
    # post_processor_config["phrase_grounding"]["banned_grounding_tokens"] (distinct entries)
    assert len(FLORENCE2_BANNED_GROUNDING_TOKENS) == 72
    assert {"the image", "image", "it", "I", "a set", "other objects"} <= (
        FLORENCE2_BANNED_GROUNDING_TOKENS
    )


def test_florence2_ocr_with_region_quads_become_their_bounding_boxes(florence_processor):
    text = (
        "</s><s>OPEN<loc_100><loc_200><loc_400><loc_210><loc_390><loc_300><loc_95><loc_290>"
        "EXIT<loc_500><loc_500><loc_600><loc_500><loc_600><loc_550><loc_500><loc_550></s>"
    )
    want = florence_processor.post_process_generation(
        text, task="<OCR_WITH_REGION>", image_size=(W, H)
    )["<OCR_WITH_REGION>"]
    status, boxes, labels = got(text, "florence2_ocr")
    assert status == "ok" and labels == want["labels"] == ["OPEN", "EXIT"]
    for box, quad in zip(boxes, want["quad_boxes"], strict=True):
        xs, ys = quad[0::2], quad[1::2]  # transformers' points, truncated to int
        assert [int(v) for v in box] == [min(xs), min(ys), max(xs), max(ys)]
    # read as phrase grounding, the same eight tokens would be two boxes
    assert len(got(text, "florence2_loc")[1]) == 4


# ------------------------------------------------------------------ box_2d: Gemini, y first
def test_gemini_box_2d_is_y_first_on_a_0_1000_grid():
    # Gemini API docs, "Image understanding" / object detection: "box_2d": [ymin, xmin, ymax,
    # xmax], normalised to 0-1000.
    text = '```json\n[{"box_2d": [100, 250, 500, 750], "label": "cat"}]\n```'
    status, boxes, labels = got(text, "gemini_json")
    assert (status, labels) == ("ok", ["cat"])
    assert boxes[0] == pytest.approx([250 * 0.64, 100 * 0.48, 750 * 0.64, 500 * 0.48])


@pytest.mark.parametrize("fmt", ["qwen25_vl_json", "qwen3_vl_json", "moondream"])
def test_other_json_formats_refuse_box_2d(fmt):
    text = '[{"box_2d": [100, 250, 500, 750], "label": "cat"}]'
    status, boxes, _ = got(text, fmt, input_size=(W, H))
    assert (status, boxes) == ("malformed", [])


def test_gemini_refuses_qwen_keys():
    assert got('[{"bbox_2d": [1, 2, 3, 4]}]', "gemini_json")[:2] == ("malformed", [])


# ------------------------------------------------------------------ DeepSeek-VL2, Moondream
def test_deepseek_vl2_grid_is_0_999():
    # DeepSeek-VL2 deepseek_vl2/serve/app_modules/utils.py, parse_ref_bbox: each box is
    # [x1, y1, x2, y2] from <|det|>[[...]]<|/det|>, int(v / 999 * size).
    text = "<|ref|>the dog<|/ref|><|det|>[[100, 200, 999, 500]]<|/det|>"
    status, boxes, labels = got(text, "deepseek_vl2")
    assert (status, labels) == ("ok", ["the dog"])
    assert [int(v) for v in boxes[0]] == [int(100 / 999 * W), int(200 / 999 * H), W, 240]
    tagless = got("the dog[[100, 200, 999, 500]]", "deepseek_vl2")
    assert tagless[1] == boxes and tagless[2] == ["the dog"]


def test_moondream_detect_objects_are_0_1():
    # moondream detect() returns {"objects": [{"x_min", "y_min", "x_max", "y_max"}]}, each
    # normalised to 0-1 of the image size (vikhyatk/moondream2 model card, "Object Detection").
    text = json.dumps({"objects": [{"x_min": 0.25, "y_min": 0.5, "x_max": 0.75, "y_max": 1.0}]})
    status, boxes, _ = got(text, "moondream", default_label="face")
    assert status == "ok" and boxes == [[160, 240, 480, 480]]


# ------------------------------------------------------------------ truncated vs malformed
STRAY = (
    '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {{"bbox_2d": [5, 6, 7, 8], "label": "b"}, '
    '{"bbox_2d": [9, 10, 11, 12], "label": "c"}]'
)


def test_stray_brace_in_a_complete_output_is_malformed_not_truncated():
    assert got(STRAY, "qwen3_vl_json", truncated=False)[0] == "malformed"
    assert got(STRAY, "qwen3_vl_json", truncated=True)[0] == "truncated"
    cut = '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6'
    assert got(cut, "qwen3_vl_json", truncated=True)[:2] == (
        "truncated",
        got(cut, "qwen3_vl_json")[1],
    )
    assert got(cut, "qwen3_vl_json", truncated=False)[0] == "malformed"
    # a complete, well-formed output that hit max_new_tokens (a repetition loop) was cut
    loop = '[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [1, 2, 3, 4]}]'
    assert got(loop, "qwen3_vl_json", truncated=True)[0] == "truncated"
    assert got(loop, "qwen3_vl_json", truncated=False)[0] == "ok"


def test_every_whole_object_after_a_stray_brace_is_recovered():
    # The shape of a real Qwen3-VL output: 9 objects, one stray "{" after the fifth.
    objs = [
        json.dumps({"bbox_2d": [10 * k, 10, 10 * k + 5, 20], "label": f"o{k}"}) for k in range(9)
    ]
    text = (
        "```json\n[\n  " + ",\n  ".join(objs[:5]) + ",\n  {" + ",\n  ".join(objs[5:]) + "\n]\n```"
    )
    status, boxes, labels = got(text, "qwen3_vl_json", truncated=False)
    assert status == "malformed" and labels == [f"o{k}" for k in range(9)]
    stray_close = '[{"bbox_2d": [1, 2, 3, 4]}}, {"bbox_2d": [5, 6, 7, 8]}]'
    assert len(got(stray_close, "qwen3_vl_json", truncated=False)[1]) == 2


# ------------------------------------------------------------------ plain boxes
def test_bare_comma_numbers_and_resized_input_pixels():
    # Qwen2.5-VL without JSON writes "x1,y1,x2,y2 label" in pixels of its resized input.
    status, boxes, labels = got(
        "43,378,996,957 cakes",
        "plain_xyxy",
        image_size=(2000, 1916),
        input_size=(1000, 958),
        coords="input_pixel",
        default_label="cakes",
    )
    assert (status, labels) == ("ok", ["cakes"])
    assert boxes == [[86, 756, 1992, 1914]]
    assert len(got("1,234,567,890 people live there", "plain_xyxy")[1]) == 1
    assert got("a population of 1,234,567,890,123", "plain_xyxy")[1] == []


def test_phrase_tags_without_box_tags_read_as_tagless():
    status, boxes, labels = got("<ref>the dog</ref>[[0, 0, 500, 500]]", "internvl")
    assert (status, labels, boxes) == ("ok", ["the dog"], [[0, 0, 320, 240]])
    status, _, labels = got("<|ref|>cat<|/ref|>[[0, 0, 999, 999]]", "deepseek_vl2")
    assert (status, labels) == ("ok", ["cat"])


def test_jsonl_records_carry_the_truncated_verdict():
    from vieval_runner.parsing import parse_record

    base = {"text": '[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5', "format": "qwen3_vl_json",
            "image_size": [1000, 1000]}  # fmt: skip
    assert parse_record(base)["status"] == "malformed"  # default: the text is complete
    assert parse_record({**base, "truncated": True})["status"] == "truncated"
    bad = parse_record({**base, "truncated": "yes"})
    assert bad["status"] == "error" and "truncated" in bad["error"]
