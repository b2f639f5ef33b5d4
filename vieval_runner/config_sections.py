"""The sections of the evaluation config (``data:``, ``scoring:``, ``watch:``, ``lora:``): each
field with its one-line description; ``config.Config`` holds them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    path: str = Field(
        description="Validation split: a JSONL/COCO/RefCOCO file or an HF dataset folder/Parquet file."
    )
    format: Literal["auto", "jsonl", "coco", "refcoco", "hf"] = Field(
        "auto", description="Input adapter; 'auto' detects it from the path."
    )
    images_root: str | None = Field(
        None, description="Folder image paths are relative to (default: the data file's folder)."
    )
    columns: dict[str, str] | None = Field(
        None,
        description="HF datasets column mapping: image, prompt, answers, boxes, id -> column name.",
    )
    strict: bool = Field(
        True,
        description="Stop at the first bad row (true) or skip bad rows and report them (false).",
    )
    limit: int | None = Field(
        None, ge=1, description="Evaluate only the first N specimens (quick looks)."
    )
    max_image_pixels: int = Field(
        1024 * 1024 * 1024 // 4 // 3,
        ge=1,
        description="Images with more pixels (width x height, read before decoding) are bad "
        "rows; default PIL's decompression-bomb limit, 89,478,485 (about 9459 x 9459).",
    )


class ScoringConfig(StrictModel):
    iou_threshold: float = Field(
        0.5, gt=0, le=1, description="IoU at which a predicted box matches a reference box."
    )
    tight_iou: float = Field(
        0.75, gt=0, le=1, description="Matches below this IoU make a specimen 'loose'."
    )
    anls_threshold: float = Field(
        0.5, gt=0, le=1, description="ANLS: similarities below this count as 0."
    )
    format_ratio: float = Field(
        3.0,
        gt=1,
        description="VQA answers this many times longer/shorter than the reference are 'format_mismatch'.",
    )
    bootstrap_resamples: int = Field(
        2000, ge=100, description="Bootstrap resamples for the stored 95% intervals of each step."
    )
    ap_bootstrap_resamples: int = Field(
        200,
        ge=50,
        description="Bootstrap resamples for the stored AP50/AP intervals (each costs far more).",
    )
    bootstrap_seed: int = Field(
        0, ge=0, description="Seed of the bootstrap resamples (fixed: intervals are reproducible)."
    )


class WatchConfig(StrictModel):
    poll_seconds: float = Field(
        10.0, gt=0, description="How often watch mode looks for new checkpoints."
    )
    settle_seconds: float = Field(
        30.0,
        ge=0,
        description="A checkpoint without trainer_state.json counts as complete once its files are this old.",
    )
    idle_timeout: float | None = Field(
        3600.0,
        description="Watch mode exits after this many seconds without a new checkpoint (null: never).",
    )


class LoraSettings(StrictModel):
    require_same_base: bool = Field(
        False,
        description="A LoRA adapter whose recorded base_model_name_or_path is not base_model "
        "fails its checkpoint (false: evaluated, with a stored warning).",
    )
