"""What every input adapter shares: errors, the load context, image headers and box checks."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vieval_runner.records import Box, DataError, Specimen

__all__ = ["DataError"]  # defined with the records: loading a specimen's image raises it too

BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image (annotation tools round up)
# PIL's own default decompression-bomb limit, Image.MAX_IMAGE_PIXELS (about 9459 x 9459)
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


class RowProblem(Exception):
    """One row is unusable; an adapter turns it into a `BadRow` (never escapes the package)."""


@dataclass
class BadRow:
    """A row that was skipped (``strict=False``) or that stopped the load (``strict=True``)."""

    file: str
    row: str  # "line 12" (JSONL), "annotation 321 (image 303)" (COCO), "row 4" (HF, 0-based)
    specimen_id: str
    problem: str

    def message(self) -> str:
        sid = f" (specimen {self.specimen_id!r})" if self.specimen_id else ""
        return f"{self.file}: {self.row}{sid}: {self.problem}"


@dataclass
class LoadResult:
    """The loaded split: specimens in file order, skipped rows, notes, and a content version."""

    specimens: list[Specimen]
    skipped: list[BadRow]
    dataset_version: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class Item:
    """What an adapter yields per candidate specimen: a specimen, or the problem with its row.

    ``explicit_id`` is False when the id was derived from the image file name; the loader then
    disambiguates images that carry several prompts (see `load_specimens`).
    """

    row: str
    specimen: Specimen | None = None
    problem: str = ""
    specimen_id: str = ""
    explicit_id: bool = True


@dataclass
class Ctx:
    """Options and per-load state handed to every adapter."""

    file: Path
    task: str | None
    images_root: Path | None = None
    columns: dict[str, str] = field(default_factory=dict)
    prompt: str | None = None
    split: str | None = None
    unannotated: str = "skip"
    clean_names: bool = True
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    warnings: list[str] = field(default_factory=list)
    _sizes: dict[Path, tuple[int, int] | str] = field(default_factory=dict)

    def resolve_image(self, ref: str, base: Path | None = None) -> Path:
        """An image path from a row: absolute, or relative to images_root / the data folder."""
        p = Path(ref)
        if p.is_absolute():
            return p
        root = self.images_root or base or (self.file if self.file.is_dir() else self.file.parent)
        return root / p

    def image_size(self, path: Path) -> tuple[int, int]:
        """(width, height) from the file header, cached per path; never decodes pixels."""
        if path not in self._sizes:
            self._sizes[path] = _header_size(path, self.max_pixels)
        got = self._sizes[path]
        if isinstance(got, str):
            raise RowProblem(got)
        return got


def allow_image_pixels(max_pixels: int) -> None:
    """Let PIL open images up to ``max_pixels`` (a limit raised in the config) without its
    decompression-bomb warning; bigger ones are bad rows before that (``_open_header``)."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _open_header(source, what: str, max_pixels: int) -> tuple[int, int] | str:
    """(width, height) from the header (no pixel decoded), or why the image is unusable."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # over the limit is reported below, as a bad row
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
    except Image.DecompressionBombError as e:  # over twice PIL's limit: only a pixel count
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        return (
            f"image {what} is too large: {size}, over data.max_image_pixels={max_pixels:,} "
            "(a decompression bomb, or raise the limit to accept it)"
        )
    except (UnidentifiedImageError, OSError, ValueError) as e:
        detail = "" if what in str(e) else f": {e}"  # PIL often repeats the path
        return f"unreadable or corrupt image {what} ({type(e).__name__}{detail})"
    if w <= 0 or h <= 0:
        return f"image {what} has no pixels ({w}x{h})"
    if w * h > max_pixels:
        return (
            f"image {what} is {w}x{h} = {w * h:,} pixels, over data.max_image_pixels="
            f"{max_pixels:,} (raise it to accept such images)"
        )
    return w, h


def _header_size(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int] | str:
    if not path.is_file():
        return f"image file not found: {path}"
    return _open_header(path, str(path), max_pixels)


def bytes_image_size(
    data: bytes, what: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[int, int]:
    """(width, height) of an encoded image held in memory (HF datasets)."""
    got = _open_header(io.BytesIO(data), what, max_pixels)
    if isinstance(got, str):
        raise RowProblem(got)
    return got


def check_box(coords: Any, width: int, height: int, label: str = "") -> Box:
    """A validated ``Box`` from ``[x1, y1, x2, y2]`` pixels; clamped within the 1 px tolerance."""
    if not isinstance(coords, list | tuple) or len(coords) != 4:
        raise RowProblem(f"box must be 4 numbers [x1, y1, x2, y2], got {coords!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in coords)
    except (TypeError, ValueError):
        raise RowProblem(f"box must be 4 numbers [x1, y1, x2, y2], got {coords!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise RowProblem(f"box has NaN or infinite coordinates: {list(coords)}")
    if x2 < x1 or y2 < y1:
        raise RowProblem(f"box has x2 < x1 or y2 < y1 (negative width/height): {list(coords)}")
    if x2 == x1 or y2 == y1:
        raise RowProblem(f"box has zero width or height: {list(coords)}")
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise RowProblem(
            f"box {list(coords)} lies outside the {width}x{height} image "
            f"(beyond the {t:g} px tolerance)"
        )
    return Box(
        max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)), label=label
    )


def xywh_to_xyxy(bbox: Any) -> list[float]:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``; a negative w/h is reported, not fixed."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise RowProblem(f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise RowProblem(f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise RowProblem(f"bbox has NaN or infinite values: {list(bbox)}")
    if w < 0 or h < 0:
        raise RowProblem(f"bbox has negative width or height: {list(bbox)}")
    return [x, y, x + w, y + h]


def answers_of(value: Any) -> list[str]:
    """Reference answers from a string, a list of strings, or VQAv2-style ``{"answer": ..}``."""
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for a in items:
        if isinstance(a, dict):
            a = a.get("answer", a.get("text"))
        if not isinstance(a, str | int | float) or isinstance(a, bool):
            raise RowProblem(f"reference answer must be text, got {a!r}")
        out.append(str(a))
    return out


def first_key(row: dict, names: Iterable[str]) -> str | None:
    """The first of ``names`` present in ``row`` (None when none is)."""
    return next((n for n in names if n in row), None)
