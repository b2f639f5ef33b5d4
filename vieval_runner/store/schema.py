"""Table layout of the store: names, Arrow schemas, format version, and row conversion.

Column names are a public contract (users' notebooks and other viewers read them): add
columns freely, rename none without a major format bump.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import pyarrow as pa

from vieval_runner.records import Box

FORMAT_VERSION = "1.0"
FORMAT_KEY = "vieval.format_version"

SPECIMENS = "specimens"
PREDICTIONS = "predictions"
EVALUATIONS = "evaluations"
TRAINING_LOG = "training_log"
TABLES: tuple[str, ...] = (SPECIMENS, PREDICTIONS, EVALUATIONS, TRAINING_LOG)


class StoreError(Exception):
    """A store that cannot be opened or written, or a row that cannot be stored."""


class StoreFull(StoreError):
    """The store's disk (or quota) is full: nothing more can be committed there.

    ``root``: the store; ``needed``: bytes the failed write needed (an estimate: the Arrow size
    of its rows plus a reserve for the commit itself); ``free``: bytes free then (None: unknown,
    e.g. object storage). The message names all three.
    """

    def __init__(self, root: str, what: str, needed: int, free: int | None, detail: str) -> None:
        self.root, self.what, self.needed, self.free = root, what, needed, free
        room = f"{human_bytes(free)} free" if free is not None else "free space unknown"
        super().__init__(
            f"the disk of store {root} is full ({detail}) while {what}: it needs about "
            f"{human_bytes(needed)} more ({room}). Every step committed so far is kept; "
            "free space there (or move the store) and run again to evaluate the rest."
        )


def human_bytes(n: int | None) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units, one decimal)."""
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


BOX = pa.struct(
    [
        ("x1", pa.float64()),
        ("y1", pa.float64()),
        ("x2", pa.float64()),
        ("y2", pa.float64()),
        ("label", pa.string()),
        ("score", pa.float64()),
    ]
)
BOXES = pa.list_(BOX)
TIMESTAMP = pa.timestamp("us", tz="UTC")


def _fields(spec: str, typ: pa.DataType) -> list[tuple[str, pa.DataType]]:
    return [(name, typ) for name in spec.split()]


SPECIMENS_SCHEMA = pa.schema(
    [
        ("dataset_version", pa.string()),
        ("specimen_id", pa.string()),
        ("task", pa.string()),
        ("prompt", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("image_path", pa.string()),
        ("image_bytes", pa.binary()),
        ("thumb_width", pa.int64()),
        ("thumb_height", pa.int64()),
        ("ref_boxes", BOXES),
        ("ref_answers", pa.list_(pa.string())),
        ("written_at", TIMESTAMP),
        # every change the loader made to the ground truth (duplicate box dropped, image
        # skipped ...): the whole list on the dataset version's first row (by specimen_id)
        ("dataset_warnings", pa.list_(pa.string())),
        ("metadata", pa.string()),  # JSON object: the validation row's other scalar fields
    ]
)

PREDICTION_METRICS = (
    _fields("tp fp fn", pa.int64())
    + _fields("precision recall f1 iou_mean acc_at_50", pa.float64())
    + _fields("exact_match vqa_accuracy token_f1 bleu rouge_l anls", pa.float64())
)

PREDICTIONS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("step", pa.int64()),
        ("eval_id", pa.string()),
        ("specimen_id", pa.string()),
        ("raw_text", pa.string()),
        ("pred_boxes", BOXES),
        ("pred_answer", pa.string()),
        ("parse_status", pa.string()),
        *PREDICTION_METRICS,
        ("failure_category", pa.string()),
        ("failure_action", pa.string()),  # the suggested action for that category
        ("input_width", pa.int64()),
        ("input_height", pa.int64()),
        ("confidence", pa.float64()),  # exp(mean token log-probability); null unless scored
        # per generated content token (null unless scored): log-probability, and the offset
        # in raw_text where the token ends; per-box scores are re-derived from them
        ("token_logprobs", pa.list_(pa.float32())),
        ("token_ends", pa.list_(pa.int32())),
        ("truncated", pa.bool_()),  # generation hit max_new_tokens; null: not recorded
    ]
)

AGGREGATE_METRICS: tuple[str, ...] = tuple(
    [
        "precision",
        "recall",
        "f1",
        "macro_f1",
        "iou_mean",
        "acc_at_50",
        "ap50",
        "ap",
        "exact_match",
        "vqa_accuracy",
        "token_f1",
        "bleu",
        "rouge_l",
        "anls",
        "parse_failure_rate",
    ]
)

EVALUATIONS_SCHEMA = pa.schema(
    [
        ("eval_id", pa.string()),
        ("run_id", pa.string()),
        ("step", pa.int64()),
        ("checkpoint_path", pa.string()),
        ("checkpoint_hash", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("started_at", TIMESTAMP),
        ("finished_at", TIMESTAMP),
        ("n_specimens", pa.int64()),
        *_fields(" ".join(AGGREGATE_METRICS), pa.float64()),
        *_fields(
            "task model_family output_format parser_version scorer_version dataset_version "
            "generation config config_hash device timings vieval_version",
            pa.string(),
        ),
        ("predictions_version", pa.int64()),
        # coordinate-frame check (scoring/frames.py): the frame whose reading of the boxes
        # fits the references best, its micro F1@0.5, and a one-line advice when it beats
        # the configured frame clearly (null otherwise)
        ("coords_best_fit", pa.string()),
        ("coords_best_fit_f1", pa.float64()),
        ("coords_advice", pa.string()),
        # JSON list of what the evaluation should be read with (e.g. a LoRA adapter trained
        # on another base); null when none. Added later: older stores gain it on first write.
        ("warnings", pa.string()),
        # JSON {"<metric>": [low, high]}: 95% specimen-bootstrap intervals at commit time
        # (readers recompute them from the predictions rows; this is the record)
        ("ci95", pa.string()),
    ]
)

#: Evaluation columns the frame check fills (besides ``AGGREGATE_METRICS``).
FRAME_CHECK_COLUMNS: tuple[str, ...] = ("coords_best_fit", "coords_best_fit_f1", "coords_advice")

TRAINING_LOG_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("step", pa.int64()),
        ("epoch", pa.float64()),
        ("loss", pa.float64()),
        ("eval_loss", pa.float64()),
        ("learning_rate", pa.float64()),
        ("grad_norm", pa.float64()),
        ("values", pa.string()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    SPECIMENS: SPECIMENS_SCHEMA,
    PREDICTIONS: PREDICTIONS_SCHEMA,
    EVALUATIONS: EVALUATIONS_SCHEMA,
    TRAINING_LOG: TRAINING_LOG_SCHEMA,
}
PARTITIONS: dict[str, list[str] | None] = {PREDICTIONS: ["step"]}

# Columns whose dict values may be Python objects that JSON-encode into a string column.
JSON_COLUMNS = frozenset({"generation", "config", "timings", "metadata", "ci95"})


def table_uri(root: str, table: str) -> str:
    """``root/table`` for a local path or any URL (``s3://bucket/store``)."""
    return f"{str(root).rstrip('/')}/{table}"


def parse_version(text: str, where: str) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; a clear error naming ``where`` otherwise."""
    try:
        major, _, minor = text.partition(".")
        return int(major), int(minor or 0)
    except ValueError:
        raise StoreError(f"{where}: unreadable store format version {text!r}") from None


def check_format(configuration: Mapping[str, str], where: str) -> str:
    """Refuse a store written by a newer major format; return the version found."""
    found = configuration.get(FORMAT_KEY)
    if found is None:
        raise StoreError(
            f"{where} is a Delta table but not a vieval store (no {FORMAT_KEY} property)"
        )
    if parse_version(found, where)[0] > parse_version(FORMAT_VERSION, "this vieval")[0]:
        raise StoreError(
            f"{where} was written in store format {found}; this vieval-runner reads format "
            f"{FORMAT_VERSION} and older majors: upgrade vieval-runner to read it"
        )
    return found


def sql_str(value: str) -> str:
    """A SQL string literal with quotes escaped (predicates and queries are built from ids)."""
    return "'" + str(value).replace("'", "''") + "'"


def now_utc() -> datetime:
    return datetime.now(UTC)


def to_timestamp(value: object, what: str) -> datetime | None:
    """datetime / ISO string / epoch seconds -> aware UTC datetime (naive is taken as UTC)."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise StoreError(f"{what}: not an ISO timestamp: {value!r}") from None
    if not isinstance(value, datetime):
        raise StoreError(f"{what}: expected a timestamp, got {type(value).__name__}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def config_hash(config: object) -> str | None:
    """Stable short hash of an evaluation config (dict or JSON string)."""
    if config is None:
        return None
    text = config if isinstance(config, str) else json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_BOX_KEYS = frozenset(("x1", "y1", "x2", "y2", "label", "score"))


def _box_rows(value: object, what: str) -> list[dict] | None:
    if value is None:
        return None
    out = []
    for i, box in enumerate(value):  # type: ignore[union-attr]
        if isinstance(box, Box):
            out.append(box.to_row())
        elif type(box) is dict and box.keys() == _BOX_KEYS and box["label"] is not None:
            out.append(box)  # a row as `Box.to_row` writes it; Arrow checks the number types
        elif isinstance(box, Mapping):
            out.append(Box.from_row(box).to_row())
        else:
            raise StoreError(f"{what}: box {i} is a {type(box).__name__}, not a Box or dict")
    return out


def _cleaner(name: str, typ: pa.DataType):
    """How one column's non-null values are made storable: ``fn(value, what)``, or None
    where they are stored as given (NaN included: it is a value, e.g. IoU of nothing)."""
    if typ == BOXES:
        return lambda value, what: _box_rows(value, f"{what} column {name!r}")
    if name in JSON_COLUMNS:
        return lambda value, what: (
            value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        )
    if typ == TIMESTAMP:
        return lambda value, what: to_timestamp(value, f"{what} column {name!r}")
    return None


def _extra_type(name: str, values: list, what: str) -> pa.DataType:
    try:
        typ = pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StoreError(f"{what}: column {name!r} has values of mixed types: {exc}") from None
    return pa.string() if pa.types.is_null(typ) else typ


def rows_to_table(rows: Iterable[Mapping], schema: pa.Schema, what: str) -> pa.Table:
    """Plain dict rows -> an Arrow table in ``schema`` (missing columns null).

    Keys outside the schema become extra columns (type inferred) so callers can add columns
    without a store change; a value that does not fit its column is an error naming the row.
    """
    rows = list(rows)
    names = set(schema.names)
    extra: list[str] = []
    for row in rows:
        extra.extend(k for k in row if k not in names and k not in extra)
    types = {f.name: f.type for f in schema}
    # column by column: the type's cleaning is chosen once, not per value
    cleaned: dict[str, list] = {}
    for name in [*schema.names, *extra]:
        values = [row.get(name) for row in rows]
        clean = _cleaner(name, types[name]) if name in types else None
        if clean is not None:
            values = [
                None if v is None else clean(v, f"{what} row {i}") for i, v in enumerate(values)
            ]
        cleaned[name] = values
    arrays, fields = [], []
    for name, values in cleaned.items():
        typ = types.get(name) or _extra_type(name, values, what)
        try:
            arrays.append(pa.array(values, type=typ))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            bad = _first_bad(values, typ)
            raise StoreError(
                f"{what} row {bad}: column {name!r} value {values[bad]!r} is not {typ}: {exc}"
            ) from None
        fields.append(pa.field(name, typ))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _first_bad(values: list, typ: pa.DataType) -> int:
    for i, v in enumerate(values):
        try:
            pa.array([v], type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return i
    return 0


def _plain(typ: pa.DataType) -> pa.DataType:
    """The reader-facing type: delta-rs's engine returns string_view; callers get string."""
    if pa.types.is_string_view(typ) or pa.types.is_large_string(typ):
        return pa.string()
    if pa.types.is_binary_view(typ) or pa.types.is_large_binary(typ):
        return pa.binary()
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_list_view(typ):
        return pa.list_(_plain(typ.value_type))
    if pa.types.is_struct(typ):
        return pa.struct([pa.field(f.name, _plain(f.type)) for f in typ])
    return typ


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Canonical column order and types; columns an older store lacks read as nulls."""
    cols, fields = [], []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col.cast(f.type) if col.type != f.type else col)
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
        fields.append(f)
    for name in table.column_names:
        if name not in schema.names:
            col = table.column(name)
            typ = _plain(col.type)
            cols.append(col.cast(typ) if typ != col.type else col)
            fields.append(pa.field(name, typ))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))
