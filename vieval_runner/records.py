"""The records that travel through the stages: `Specimen` in, `Prediction` out, and between
them the resident model (`LoadedModel`) and each specimen's processor outputs
(`PreparedSpecimen`).

Every stage module imports these; none defines its own copy. Boxes are always in
original-image pixels, ``x1 <= x2`` and ``y1 <= y2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vieval_runner.families import FAMILIES

if TYPE_CHECKING:  # records stay importable without torch (``vieval parse``)
    import torch

Task = Literal["grounding", "vqa"]
TASKS: tuple[str, ...] = ("grounding", "vqa")

ParseStatus = Literal["ok", "empty", "truncated", "malformed", "out_of_range"]
PARSE_STATUSES: tuple[str, ...] = ("ok", "empty", "truncated", "malformed", "out_of_range")


@dataclass(frozen=True)
class Box:
    """One box in original-image pixels, with an optional label and confidence score."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""
    score: float | None = None
    # where the parser read this box in the raw output text: ``raw_text[start:end]``. It ties
    # the box to the tokens that wrote it (per-box scores); not part of equality, hashing or
    # the store's box struct.
    span: tuple[int, int] | None = field(default=None, compare=False)
    # the four numbers as the output wrote them (x1, y1, x2, y2 in the format's own units,
    # before scaling, ordering and clamping), for formats whose numbers are free text: the
    # coordinate-frame check re-maps them under other frames. Not stored, not compared.
    raw: tuple[float, float, float, float] | None = field(default=None, compare=False)

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]

    def to_row(self) -> dict:
        """The store's box struct: ``{x1, y1, x2, y2, label, score}``."""
        return {
            "x1": float(self.x1),
            "y1": float(self.y1),
            "x2": float(self.x2),
            "y2": float(self.y2),
            "label": self.label,
            "score": None if self.score is None else float(self.score),
        }

    @classmethod
    def from_row(cls, row: dict) -> Box:
        return cls(
            row["x1"], row["y1"], row["x2"], row["y2"], row.get("label") or "", row.get("score")
        )


class CheckpointError(Exception):
    """A run folder or checkpoint that cannot be used as asked: none found, incomplete, or
    weights that do not fit the model (the message names the path and why)."""


def scalar_fields(row: dict, used: set[str]) -> dict[str, str | int | float | bool]:
    """A row's fields not in ``used`` whose values are scalars (kept as specimen metadata)."""
    return {
        str(k): v
        for k, v in row.items()
        if k not in used and isinstance(v, str | int | float | bool) and v is not None
    }


class DataError(Exception):
    """Bad validation data; the message names the file, the row and the problem."""


@dataclass
class Specimen:
    """One evaluation specimen: an image, a prompt and its reference."""

    specimen_id: str
    task: Task
    prompt: str
    width: int
    height: int
    image_path: str | None = None
    image_bytes: bytes | None = None
    ref_boxes: list[Box] = field(default_factory=list)
    ref_answers: list[str] = field(default_factory=list)
    # the validation row's other fields (JSONL keys, COCO image attributes, HF columns) with
    # scalar values: what `vieval summary --by FIELD` and the viewer break metrics down by
    metadata: dict[str, str | int | float | bool] = field(default_factory=dict)

    def load_image(self):
        """The image as an RGB ``PIL.Image`` (decoded on demand, never cached here).

        ``DataError`` naming the specimen and the file when it cannot be decoded (a truncated
        file passes the header check on load and fails only here). An RGB file is decoded
        once and returned as is: ``convert("RGB")`` would copy it, twice the peak memory."""
        import io

        from PIL import Image

        if self.image_bytes is None and self.image_path is None:
            raise DataError(f"specimen {self.specimen_id!r} has neither image_path nor image_bytes")
        try:
            if self.image_bytes is None:
                with open(self.image_path, "rb") as file:
                    img = Image.open(file)
                    img.load()  # every pixel read while the file is open
            else:
                img = Image.open(io.BytesIO(self.image_bytes))
                img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
        except Exception as exc:  # any decode or IO failure of this one image
            raise DataError(
                f"specimen {self.specimen_id!r}: cannot load image "
                f"{self.image_path or '<bytes>'}: {exc}"
            ) from exc


@dataclass
class ParseResult:
    """What a parser made of one model output. Parsers never raise: junk is a status."""

    status: ParseStatus
    boxes: list[Box] = field(default_factory=list)
    answer: str | None = None


@dataclass
class Prediction:
    """One specimen's result at one step: raw text, what was parsed, and its scores."""

    specimen_id: str
    raw_text: str
    parse_status: ParseStatus
    pred_boxes: list[Box] = field(default_factory=list)
    pred_answer: str | None = None
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    failure_category: str = ""
    input_size: tuple[int, int] | None = None
    confidence: float | None = None  # exp(mean token log-probability), when scored
    # when scored: each generated content token's log-probability and the offset in raw_text
    # where it ends, so box scores can be re-derived from re-parsed text (``vieval rescore``)
    token_logprobs: list[float] | None = None
    token_ends: list[int] | None = None
    # generation hit max_new_tokens (None: unknown, e.g. rows stored before it was kept);
    # the parser uses it to tell a cut-off output (truncated) from a badly formed one
    truncated: bool | None = None


@dataclass
class LoadedModel:
    """The resident model and what the later stages need to know about it."""

    model: Any
    processor: Any
    family: str
    device: torch.device
    dtype: torch.dtype
    base_model: str
    base_weights_dir: Path | None = None
    current: str = "base"  # which weights are resident: "base" or a checkpoint path
    adapter: str | None = None  # name of the active peft LoRA adapter, if any
    # the base's tensors on the host, when they cannot be re-read from files
    base_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    base_replaced: bool = False  # a full checkpoint's tensors overwrote the base's
    peft_model: Any = field(default=None, repr=False)  # the PeftModel wrapper while adapters are on
    # (parameter, requires_grad) of the base as it was before peft froze it (model.lora)
    base_requires_grad: Any = field(default=None, repr=False)
    adapter_count: int = 0  # adapters loaded so far (names each new one uniquely)
    # content hash of the resident vision part, set by every swap; None: unknown (recompute)
    vision_hash: str | None = None
    hash_vision: bool = True  # hash the vision part on swaps (off: no embedding cache to feed)
    base_vision_hash: str | None = None  # the untouched base's vision hash, once known
    keys: Any = field(default=None, repr=False)  # model.keys.ModelKeys, computed once
    # generate.decoding's verdicts: lean loop (and CUDA-graph mode) per generation setting
    lean_verdicts: dict[str, tuple[bool, str | None]] = field(default_factory=dict, repr=False)

    @property
    def facts(self) -> dict[str, Any]:
        """The family's entry in ``families.FAMILIES``."""
        return FAMILIES[self.family]


# processor outputs aligned with the token sequence: padded per batch; the rest are concatenated
SEQ_KEYS = {"input_ids": "pad", "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0}


@dataclass
class PreparedSpecimen:
    """One specimen's processor outputs (batch dim removed for sequence tensors)."""

    specimen_id: str
    input_ids: torch.Tensor  # (seq,)
    # every other processor output, as the processor gave it (pixels, grids, type ids)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    input_size: tuple[int, int] | None = None

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[0])
