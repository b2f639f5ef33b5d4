"""The demo's training data path: answers round-trip through the parser, prompts match eval."""

from __future__ import annotations

import pytest
import torch

from vieval_runner import parsing
from vieval_runner.demo import shapes, training
from vieval_runner.prepare.inputs import prepare
from vieval_runner.records import Box, LoadedModel


@pytest.fixture(scope="module")
def paligemma():
    from vieval_runner.testing.tiny_models import build_tiny_model

    model, processor = build_tiny_model("paligemma")
    return LoadedModel(model, processor, "paligemma", torch.device("cpu"), torch.float32, "tiny")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    rows = {}
    for task in ("grounding", "vqa"):
        path = shapes.write_split(folder, n=12, task=task, seed=3, name=f"t_{task}")
        rows[task] = training.read_rows(path)
    return folder, rows


@pytest.mark.parametrize("size", [(64, 64), (100, 60)])
def test_paligemma_target_parses_back_to_the_reference(size):
    w, h = size
    row = {"task": "grounding", "boxes": [
        {"label": "the red circle", "box": [4, 4, 28, 28]},
        {"label": "the blue square", "box": [36, 8, w, h]},
    ]}  # fmt: skip
    text = training.paligemma_target(row, w, h)
    result = parsing.parse_grounding(text, "paligemma_loc", (w, h))
    assert result.status == "ok"
    assert [b.label for b in result.boxes] == ["the red circle", "the blue square"]
    for got, ref in zip(result.boxes, row["boxes"], strict=True):
        # one 1024-bin is the most the rounding may move a coordinate
        assert got.as_list() == pytest.approx(ref["box"], abs=max(w, h) / 1024)


def test_dataset_masks_the_prompt_and_matches_the_evaluation_prompt(paligemma, split):
    folder, rows = split
    for task in ("grounding", "vqa"):
        data = training.ShapesDataset(rows[task], folder, paligemma)
        specimen = _specimen(rows[task][0], folder)
        prepared = prepare(paligemma, [specimen])[0]
        item = data[0]
        n_prompt = prepared.prompt_len
        # the runner asks exactly what training taught: same prompt tokens, same pixels
        assert torch.equal(item["input_ids"][:n_prompt], prepared.input_ids)
        assert torch.equal(item["pixel_values"], prepared.tensors["pixel_values"][0])
        labels = item["labels"]
        assert (labels[:n_prompt] == training.IGNORE_INDEX).all()
        answer = labels[n_prompt:]
        assert (answer != training.IGNORE_INDEX).all()
        assert answer[-1].item() == paligemma.processor.tokenizer.eos_token_id
        text = paligemma.processor.tokenizer.decode(answer[:-1], skip_special_tokens=False)
        expected = training.paligemma_target(rows[task][0], specimen.width, specimen.height)
        assert text.strip() == expected.strip()


def _specimen(row, folder):
    from vieval_runner.records import Specimen

    return Specimen(
        row["id"], row["task"], row["prompt"], 64, 64, image_path=str(folder / row["image"]),
        ref_boxes=[Box(*b["box"], label=b["label"]) for b in row.get("boxes", [])],
    )  # fmt: skip


def test_collator_pads_right_with_ignored_labels(paligemma, split):
    folder, rows = split
    data = training.ShapesDataset(rows["vqa"], folder, paligemma)
    items = [data[i] for i in range(len(data))]
    lengths = [len(i["input_ids"]) for i in items]
    assert len(set(lengths)) > 1  # questions differ in length: padding is exercised
    pad = paligemma.processor.tokenizer.pad_token_id
    batch = training.PadCollator(pad)(items)
    width = max(lengths)
    assert batch["input_ids"].shape == (len(items), width)
    assert batch["pixel_values"].shape[0] == len(items)
    for row, n in enumerate(lengths):
        assert torch.equal(batch["input_ids"][row, :n], items[row]["input_ids"])
        assert (batch["input_ids"][row, n:] == pad).all()
        assert (batch["labels"][row, n:] == training.IGNORE_INDEX).all()
        assert (batch["attention_mask"][row, n:] == 0).all()
        assert batch["attention_mask"][row, :n].all()


def test_unsupported_family_is_a_clear_error(paligemma):
    other = LoadedModel(paligemma.model, paligemma.processor, "qwen2_vl", "cpu", None, "x")
    with pytest.raises(ValueError, match="qwen2_vl"):
        training.ShapesDataset([], ".", other)


def test_read_rows_names_the_bad_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"train\.jsonl row 2"):
        training.read_rows(path)
