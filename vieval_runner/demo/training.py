"""The demo's fine-tuning: a real ``transformers.Trainer`` on the synthetic shapes splits.

Kept out of the evaluation path on purpose: `vieval run` never trains. The prompt text is the
one evaluation builds (``prepare.inputs.build_prompt``), so what the model learns here is what the
runner asks; only the answer tokens carry labels (the prompt is masked with -100).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100  # the label value the loss ignores


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one demo fine-tune (all steps are optimizer steps)."""

    max_steps: int = 600
    save_steps: int = 100
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    logging_steps: int = 20
    seed: int = 0


def paligemma_target(row: dict, width: int, height: int) -> str:
    """PaliGemma's answer text for a shapes row: ``<locY1><locX1><locY2><locX2> phrase`` or
    the VQA answer. Bins are ``round(v / size * 1024)``, the inverse of the parser's
    ``bin / 1024 * size``, so a perfect answer parses back to the reference box."""
    if row["task"] == "vqa":
        return row["answers"][0]
    parts = []
    for ref in row["boxes"]:
        x1, y1, x2, y2 = ref["box"]
        yxyx = (y1 / height, x1 / width, y2 / height, x2 / width)
        locs = "".join(f"<loc{min(max(round(v * 1024), 0), 1023):04d}>" for v in yxyx)
        parts.append(f"{locs} {ref['label']}")
    return " ; ".join(parts)


# family -> answer-text builder; the families whose processors mask the prompt for us
TARGETS: dict[str, Callable[[dict, int, int], str]] = {"paligemma": paligemma_target}


def read_rows(jsonl: str | Path) -> list[dict]:
    """The rows of a shapes split (``shapes.write_split``), with a clear error per bad line."""
    path = Path(jsonl)
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} row {i}: not JSON ({exc})") from None
    return rows


class ShapesDataset(torch.utils.data.Dataset):
    """Shapes rows as processor inputs with labels (prompt masked), encoded once and cached."""

    def __init__(self, rows: Sequence[dict], root: str | Path, loaded) -> None:
        from vieval_runner.prepare.inputs import build_prompt

        if loaded.family not in TARGETS:
            raise ValueError(
                f"demo training supports {', '.join(TARGETS)}, not family {loaded.family!r}"
            )
        self.rows = list(rows)
        self.root = Path(root)
        self.loaded = loaded
        self._build_prompt = build_prompt
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._cache:
            self._cache[index] = self._encode(self.rows[index])
        return self._cache[index]

    def _encode(self, row: dict) -> dict[str, torch.Tensor]:
        from PIL import Image

        from vieval_runner.records import Specimen

        with Image.open(self.root / row["image"]) as img:
            image = img.convert("RGB")
        specimen = Specimen(str(row["id"]), row["task"], row["prompt"], *image.size)
        prompt = self._build_prompt(self.loaded, specimen)
        target = TARGETS[self.loaded.family](row, *image.size)
        out = self.loaded.processor(
            images=[image], text=[prompt], suffix=[target], return_tensors="pt"
        )
        return {k: v[0] for k, v in out.items() if isinstance(v, torch.Tensor)}


class PadCollator:
    """Right-pads a batch (labels with -100, masks with 0) and stacks the pixel tensors."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(item["input_ids"].shape[0] for item in items)
        batch = {}
        for key in items[0]:
            values = [item[key] for item in items]
            if values[0].dim() == 1:  # a token sequence
                fill = self.pad.get(key, 0)
                values = [
                    torch.cat([v, torch.full((width - v.shape[0],), fill, dtype=v.dtype)])
                    for v in values
                ]
            batch[key] = torch.stack(values)
        return batch


def fine_tune(
    loaded,
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    data_root: str | Path,
    run_dir: str | Path,
    settings: TrainSettings,
    progress: bool = True,
):
    """Fine-tune ``loaded.model`` with ``transformers.Trainer``; checkpoints land in
    ``run_dir/checkpoint-<step>/`` every ``save_steps`` (weights, config and
    ``trainer_state.json`` with the real loss / eval_loss history). Returns the Trainer."""
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(settings.seed)
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup_steps,
        weight_decay=0.0,
        logging_steps=settings.logging_steps,
        eval_strategy="steps",
        eval_steps=settings.save_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_only_model=True,  # the demo never resumes: skip optimizer state
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,  # single-process loading: deterministic and cheap here
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress,
    )
    model = loaded.model
    model.train()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ShapesDataset(train_rows, data_root, loaded),
        eval_dataset=ShapesDataset(eval_rows, data_root, loaded),
        data_collator=PadCollator(loaded.processor.tokenizer.pad_token_id),
    )
    trainer.train()
    model.eval()
    return trainer
