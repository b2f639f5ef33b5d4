"""The records that travel through the stages: `Specimen` in, `Prediction` out.

Every stage module imports these; none defines its own copy. Boxes are always in
original-image pixels, ``x1 <= x2`` and ``y1 <= y2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
        file passes the header check on load and fails only here)."""
        import io

        from PIL import Image

        if self.image_bytes is None and self.image_path is None:
            raise DataError(f"specimen {self.specimen_id!r} has neither image_path nor image_bytes")
        try:
            source = self.image_path if self.image_bytes is None else io.BytesIO(self.image_bytes)
            with Image.open(source) as img:
                return img.convert("RGB")
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
