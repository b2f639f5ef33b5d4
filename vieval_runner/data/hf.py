"""Hugging Face ``datasets`` data: a ``save_to_disk`` folder, or Parquet/Arrow file(s).

Columns (``columns`` maps each role to a column name; defaults in `DEFAULT_COLUMNS`): ``image``
(a datasets ``Image`` struct ``{bytes, path}``, raw bytes, or a path string), ``prompt``,
``answers`` (vqa: text or list of text), ``boxes`` (grounding: list of ``{phrase|label,
box|bbox}`` or of ``[x1, y1, x2, y2]`` pixels), ``id`` (optional). Images held as bytes stay
encoded in ``Specimen.image_bytes``; rows are read batch by batch from the Arrow table.
Specimen id: the ``id`` column, else the image path's file name, else ``row-<index>``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from vieval_runner.data.common import (
    Ctx,
    DataError,
    Item,
    RowProblem,
    answers_of,
    bytes_image_size,
)
from vieval_runner.data.jsonl import parse_boxes
from vieval_runner.records import Specimen, scalar_fields

DEFAULT_COLUMNS = {
    "image": ("image", "image_path", "file_name"),
    "prompt": ("prompt", "question", "phrase", "query"),
    "answers": ("answers", "answer"),
    "boxes": ("boxes",),
    "id": ("id", "specimen_id", "question_id"),
}
_SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


def is_hf_path(path: Path) -> bool:
    """True for a save_to_disk folder, a .parquet/.arrow file, or a folder of them."""
    if path.is_file():
        return path.suffix in (".parquet", ".arrow")
    return path.is_dir() and (
        any((path / m).is_file() for m in _SAVED_MARKERS)
        or any(path.glob("*.parquet"))
        or any(path.glob("*.arrow"))
    )


def _read_arrow_file(f: Path) -> pa.Table:
    # datasets writes the IPC *stream* format; other tools write the file format.
    try:
        with pa.ipc.open_stream(f) as r:
            return r.read_all()
    except pa.ArrowInvalid:
        with pa.ipc.open_file(f) as r:
            return r.read_all()


def _table(path: Path, split: str | None) -> pa.Table:
    """The split as one Arrow table, whatever way it was stored."""
    if path.is_dir() and any((path / m).is_file() for m in _SAVED_MARKERS):
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises IndexError, FileNotFoundError, ... here
            arrows = list(path.rglob("*.arrow"))
            if all(_read_arrow_file(f).num_rows == 0 for f in arrows):  # none: empty too
                # datasets 5.2 cannot reload a saved empty dataset at all
                raise DataError(f"{path}: split {split or '(default)'} is empty (0 rows)") from e
            raise DataError(
                f"{path}: cannot load the saved dataset ({type(e).__name__}: {e})"
            ) from e
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds)
            if split is None and len(names) == 1:
                split = names[0]
            if split not in ds:
                want = "a split" if split is None else f"split {split!r}"
                raise DataError(f"{path}: choose {want} from the saved splits: {', '.join(names)}")
            ds = ds[split]
        if ds.num_rows == 0:
            raise DataError(f"{path}: split {split or '(default)'} is empty (0 rows)")
        # with_format("arrow") honours an indices mapping (select/shuffle) without decoding images
        return ds.with_format("arrow")[:]
    files = [path] if path.is_file() else sorted([*path.glob("*.parquet"), *path.glob("*.arrow")])
    if path.is_dir() and split is not None:
        chosen = [f for f in files if f.name.startswith(split)]
        if not chosen:
            raise DataError(
                f"{path}: no file for split {split!r} among {', '.join(f.name for f in files)}"
            )
        files = chosen
    import pyarrow.parquet as pq

    try:
        tables = [
            pq.read_table(f) if f.suffix == ".parquet" else _read_arrow_file(f) for f in files
        ]
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable Parquet/Arrow data ({e})") from e


def _resolve_columns(table: pa.Table, ctx: Ctx, path: Path, task: str) -> dict[str, str | None]:
    names = table.column_names
    out: dict[str, str | None] = {}
    for role, defaults in DEFAULT_COLUMNS.items():
        if role in ctx.columns:
            if ctx.columns[role] not in names:
                raise DataError(
                    f"{path}: column {ctx.columns[role]!r} (mapped as {role}) not found; "
                    f"available columns: {', '.join(names)}"
                )
            out[role] = ctx.columns[role]
        else:
            out[role] = next((c for c in defaults if c in names), None)
    unknown = set(ctx.columns) - set(DEFAULT_COLUMNS)
    if unknown:
        raise DataError(
            f"{path}: unknown column role(s) {sorted(unknown)}; roles: {', '.join(DEFAULT_COLUMNS)}"
        )
    needed = ["image", "boxes" if task == "grounding" else "answers"]
    if ctx.prompt is None:
        needed.append("prompt")
    for role in needed:
        if out[role] is None:
            raise DataError(
                f"{path}: no {role} column (tried {', '.join(DEFAULT_COLUMNS[role])}); map it with "
                f"columns={{'{role}': ...}}; available columns: {', '.join(names)}"
            )
    return out


def _image(value, ctx: Ctx, base: Path, what: str) -> tuple[bytes | None, Path | None]:
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], None
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value), None
    if isinstance(value, str) and value:
        return None, ctx.resolve_image(value, base)
    raise RowProblem(f"no image in {what} (got {type(value).__name__})")


def load_hf(path: Path, ctx: Ctx) -> Iterator[Item]:
    """Adapter for ``fmt="hf"``."""
    if not path.exists():
        raise DataError(f"{path}: not found")
    task = ctx.task or "grounding"
    table = _table(path, ctx.split)
    if table.num_rows == 0:
        raise DataError(f"{path}: split {ctx.split or '(default)'} is empty (0 rows)")
    cols = _resolve_columns(table, ctx, path, task)
    base = path if path.is_dir() else path.parent
    i = -1
    for batch in table.to_batches(max_chunksize=256):
        for row in batch.to_pylist():
            i += 1
            label = f"row {i}"
            given = row.get(cols["id"]) if cols["id"] else None
            try:
                data, img_path = _image(row[cols["image"]], ctx, base, f"column {cols['image']!r}")
                if data is not None:
                    width, height = bytes_image_size(
                        data, f"bytes in column {cols['image']!r}", ctx.max_pixels
                    )
                else:
                    width, height = ctx.image_size(img_path)
                prompt = row.get(cols["prompt"]) if cols["prompt"] else ctx.prompt
                if not isinstance(prompt, str) or not prompt.strip():
                    raise RowProblem(f"empty or non-text prompt {prompt!r}")
                boxes, answers = [], []
                if task == "grounding":
                    boxes = parse_boxes(row[cols["boxes"]] or [], width, height, prompt)
                else:
                    answers = answers_of(row[cols["answers"]])
                    if not answers:
                        raise RowProblem("no reference answer")
            except RowProblem as e:
                yield Item(label, problem=str(e), specimen_id="" if given is None else str(given))
                continue
            raw = row[cols["image"]]
            src = (
                raw.get("path")
                if isinstance(raw, dict)
                else (raw if isinstance(raw, str) else None)
            )
            if given not in (None, ""):
                sid, explicit = str(given), True
            else:
                sid, explicit = (Path(src).name if src else f"row-{i}"), False
            yield Item(
                label,
                Specimen(
                    specimen_id=sid,
                    task=task,  # type: ignore[arg-type]
                    prompt=prompt,
                    width=width,
                    height=height,
                    image_path=None if img_path is None else str(img_path),
                    image_bytes=data,
                    ref_boxes=boxes,
                    ref_answers=answers,
                    metadata=scalar_fields(row, set(cols.values())),
                ),
                explicit_id=explicit,
            )
