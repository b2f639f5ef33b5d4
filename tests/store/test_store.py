"""The Delta Lake store: writer, reader, versions, maintenance (real deltalake, tmp stores)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from PIL import Image

from vieval_runner.records import Box, DataError, Specimen
from vieval_runner.store import (
    FORMAT_KEY,
    FORMAT_VERSION,
    StoreError,
    commit_step,
    commit_steps,
    compact,
    create_store,
    open_store,
    record_failed_evaluation,
    stored_evaluations,
    table_uri,
    write_specimens,
    write_training_log,
)

SPECIMEN_COLUMNS = [
    "dataset_version",
    "specimen_id",
    "task",
    "prompt",
    "width",
    "height",
    "image_path",
    "image_bytes",
    "ref_boxes",
    "ref_answers",
]
PREDICTION_COLUMNS = [
    "run_id",
    "step",
    "eval_id",
    "specimen_id",
    "raw_text",
    "pred_boxes",
    "pred_answer",
    "parse_status",
    "tp",
    "fp",
    "fn",
    "precision",
    "recall",
    "f1",
    "iou_mean",
    "acc_at_50",
    "exact_match",
    "vqa_accuracy",
    "token_f1",
    "bleu",
    "rouge_l",
    "anls",
    "failure_category",
    "input_width",
    "input_height",
]
EVALUATION_COLUMNS = [
    "eval_id",
    "run_id",
    "step",
    "checkpoint_path",
    "checkpoint_hash",
    "status",
    "error",
    "started_at",
    "finished_at",
    "n_specimens",
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
    "task",
    "model_family",
    "output_format",
    "parser_version",
    "scorer_version",
    "dataset_version",
    "generation",
    "config",
    "device",
    "timings",
    "vieval_version",
]
BOX_TYPE = pa.list_(
    pa.struct(
        [(n, pa.float64()) for n in ("x1", "y1", "x2", "y2")]
        + [("label", pa.string()), ("score", pa.float64())]
    )
)


def rows(n: int, tag: str, start: int = 0) -> list[dict]:
    """``n`` grounding prediction rows whose raw_text carries ``tag``."""
    return [
        {
            "specimen_id": f"s{i:03d}",
            "raw_text": f"{tag} {i}",
            "pred_boxes": [
                Box(1.0, 2.0, 30.0 + i, 40.0, "cat", 0.9),
                {"x1": 0, "y1": 0, "x2": 5, "y2": 5},
            ],
            "parse_status": "ok",
            "tp": 1,
            "fp": 1,
            "fn": 0,
            "precision": 0.5,
            "recall": 1.0,
            "f1": 2 / 3,
            "iou_mean": 0.75,
            "failure_category": "false_positive",
            "input_size": (448, 336),
        }
        for i in range(start, start + n)
    ]


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path) -> str:
    root = str(tmp_path / "store")
    create_store(root)
    return root


def test_roundtrip_with_contract_columns(store):
    create_store(store)  # idempotent
    spec = Specimen(
        "s000",
        "grounding",
        "a cat",
        640,
        480,
        image_bytes=png_bytes(640, 480),
        ref_boxes=[Box(1, 2, 3, 4, "cat")],
    )
    assert write_specimens(store, [spec], "v1")
    version = commit_step(
        store,
        {
            "run_id": "run-a",
            "step": 100,
            "checkpoint_path": "/ckpt/checkpoint-100",
            "f1": 0.66,
            "generation": {"max_new_tokens": 32},
            "config": {"batch_size": 8},
            "task": "grounding",
        },
        rows(3, "hello"),
    )
    r = open_store(store)
    assert r.version["predictions"] == version
    assert r.runs() == ["run-a"] and r.steps("run-a") == [100]

    step = r.step("run-a", 100)
    assert [c for c in step.column_names if c in PREDICTION_COLUMNS] == PREDICTION_COLUMNS
    assert step.schema.field("pred_boxes").type == BOX_TYPE
    assert step.schema.field("step").type == pa.int64()
    first = step.to_pylist()[0]
    assert first["raw_text"] == "hello 0" and first["specimen_id"] == "s000"
    assert first["pred_boxes"][0] == {
        "x1": 1.0,
        "y1": 2.0,
        "x2": 30.0,
        "y2": 40.0,
        "label": "cat",
        "score": 0.9,
    }
    assert first["pred_boxes"][1]["score"] is None
    assert (first["input_width"], first["input_height"]) == (448, 336)
    assert first["exact_match"] is None and first["pred_answer"] is None
    assert len(set(step.column("eval_id").to_pylist())) == 1

    evals = r.evaluations()
    assert [c for c in evals.column_names if c in EVALUATION_COLUMNS] == EVALUATION_COLUMNS
    ev = evals.to_pylist()[0]
    assert ev["status"] == "ok" and ev["n_specimens"] == 3 and ev["eval_id"] == first["eval_id"]
    assert json.loads(ev["generation"]) == {"max_new_tokens": 32}
    assert ev["finished_at"].tzinfo is not None

    specs = r.specimens()
    assert [c for c in SPECIMEN_COLUMNS if c != "image_bytes"] == [
        c for c in specs.column_names if c in SPECIMEN_COLUMNS
    ]
    assert specs.to_pylist()[0]["ref_boxes"][0]["label"] == "cat"
    assert "image_bytes" in r.specimens(with_images=True).column_names


def test_reevaluation_replaces_step_in_one_commit_and_time_travel(store):
    v1 = commit_step(store, {"run_id": "r", "step": 100, "f1": 0.1}, rows(4, "old"))
    commit_step(store, {"run_id": "r", "step": 200, "f1": 0.2}, rows(4, "two"))
    reader = open_store(store)
    assert set(reader.step("r", 100).column("raw_text").to_pylist()) == {
        f"old {i}" for i in range(4)
    }
    v3 = commit_step(store, {"run_id": "r", "step": 100, "f1": 0.9}, rows(3, "new"))
    assert v3 == v1 + 2  # exactly one predictions commit for the replacement

    dt = DeltaTable(table_uri(store, "predictions"))
    last = dt.history(limit=1)[0]
    assert last["operation"] == "WRITE" and "step = 100" in last["operationParameters"]["predicate"]

    assert reader.refresh() is True
    now = reader.step("r", 100)  # cache invalidated by the new commit
    assert now.column("raw_text").to_pylist() == ["new 0", "new 1", "new 2"]
    assert reader.refresh() is False

    old = open_store(store, as_of=v1)
    assert old.steps("r") == [100]
    assert old.step("r", 100).column("raw_text").to_pylist() == [f"old {i}" for i in range(4)]
    assert old.aggregates("r").column("f1").to_pylist() == [0.1]
    assert old.refresh() is False
    assert open_store(store, as_of=str(v1)).steps("r") == [100]

    evals = reader.evaluations("r")
    assert evals.column("f1").to_pylist() == [0.1, 0.2, 0.9]  # every evaluation kept
    agg = reader.aggregates("r")
    assert agg.column("step").to_pylist() == [100, 200]
    assert agg.column("f1").to_pylist() == [0.9, 0.2]
    assert agg.column("eval_id").to_pylist()[0] == now.column("eval_id")[0].as_py()

    hist = reader.specimen_history("r", "s003")  # s003 left in the re-evaluation of step 100
    assert hist.column("step").to_pylist() == [200]
    assert reader.specimen_history("r", "s000").column("raw_text").to_pylist() == ["new 0", "two 0"]
    assert reader.specimen_history("r", "nope").num_rows == 0

    when = datetime.fromtimestamp(dt.history()[-2]["timestamp"] / 1000, UTC)  # version 1
    by_time = open_store(store, as_of=when.isoformat())
    assert by_time.step("r", 100).column("raw_text").to_pylist()[0] == "old 0"
    with pytest.raises(StoreError, match="as of 999"):
        open_store(store, as_of=999)


def test_several_steps_in_two_commits(store):
    commit_step(store, {"run_id": "r", "step": 100, "f1": 0.1}, rows(4, "old"))
    before = open_store(store).version["predictions"]
    version = commit_steps(store, [
        ({"run_id": "r", "step": 100, "f1": 0.5}, rows(2, "a")),  # replaces the old rows
        ({"run_id": "r", "step": 200, "f1": 0.6}, rows(3, "b")),
        ({"run_id": "q'x", "step": 100, "f1": 0.7}, rows(1, "c")),  # another run, quoted
    ])  # fmt: skip
    reader = open_store(store)
    assert version == before + 1 == reader.version["predictions"]  # one predictions commit
    dt = DeltaTable(table_uri(store, "evaluations"))
    assert dt.history(limit=1)[0]["operation"] == "WRITE"  # and one append of three markers
    assert len(dt.to_pyarrow_table().filter(pa.compute.field("f1") >= 0.5)) == 3
    assert reader.step("r", 100).column("raw_text").to_pylist() == ["a 0", "a 1"]
    assert reader.step("r", 200).column("raw_text").to_pylist() == ["b 0", "b 1", "b 2"]
    assert reader.step("q'x", 100).column("raw_text").to_pylist() == ["c 0"]
    markers = {(e["run_id"], e["step"]): e for e in reader.evaluations().to_pylist()}
    assert {markers[k]["predictions_version"] for k in [("r", 200), ("q'x", 100)]} == {version}
    assert reader.aggregates("r").column("f1").to_pylist() == [0.5, 0.6]
    with pytest.raises(StoreError, match="step 200 of run 'r' twice in one commit"):
        commit_steps(store, [({"run_id": "r", "step": 200}, rows(1, "d"))] * 2)
    assert open_store(store).version["predictions"] == version  # nothing written


def test_failed_evaluation_is_logged_and_keeps_predictions(store):
    commit_step(store, {"run_id": "r", "step": 100, "f1": 0.5, "config": {"a": 1}}, rows(2, "ok"))
    record_failed_evaluation(
        store,
        {
            "run_id": "r",
            "step": 100,
            "checkpoint_path": "/c/checkpoint-100",
            "error": "safetensors: header too large",
        },
    )
    record_failed_evaluation(store, {"run_id": "r2", "step": 0, "error": "OOM"})
    r = open_store(store)
    evals = r.evaluations()
    assert evals.column("status").to_pylist() == ["ok", "failed", "failed"]
    assert evals.column("error").to_pylist()[1] == "safetensors: header too large"
    assert r.runs() == ["r", "r2"] and r.steps("r2") == []
    assert r.aggregates("r").column("f1").to_pylist() == [0.5]
    assert r.step("r", 100).num_rows == 2
    light = stored_evaluations(store)
    assert [e["status"] for e in light] == ["ok", "failed", "failed"]
    assert light[0]["config_hash"] and light[0]["checkpoint_hash"] is None
    assert {"run_id", "step", "checkpoint_hash", "status", "config_hash"} <= set(light[0])


def test_bad_rows_are_named_errors(store):
    with pytest.raises(StoreError, match="row 1 .*step 5 differs"):
        commit_step(
            store,
            {"run_id": "r", "step": 4},
            [{"specimen_id": "a"}, {"specimen_id": "b", "step": 5}],
        )
    with pytest.raises(StoreError, match="duplicate specimen_id 'a'"):
        commit_step(store, {"run_id": "r", "step": 4}, [{"specimen_id": "a"}, {"specimen_id": "a"}])
    with pytest.raises(StoreError, match="row 0: column 'tp'"):
        commit_step(store, {"run_id": "r", "step": 4}, [{"specimen_id": "a", "tp": "many"}])
    with pytest.raises(StoreError, match="int step"):
        commit_step(store, {"run_id": "r", "step": "4"}, [])
    assert open_store(store).runs() == []  # nothing half-written


def test_quoted_run_ids_and_extra_columns(store):
    commit_step(store, {"run_id": "it's", "step": 1}, rows(2, "q"))
    commit_step(store, {"run_id": "it", "step": 1}, rows(1, "p"))
    commit_step(store, {"run_id": "it's", "step": 1}, [dict(rows(1, "q2")[0], my_metric=0.25)])
    r = open_store(store)
    assert r.runs() == ["it", "it's"]
    assert r.step("it", 1).column("raw_text").to_pylist() == ["p 0"]
    got = r.step("it's", 1)
    assert got.column("raw_text").to_pylist() == ["q2 0"]
    assert got.column("my_metric").to_pylist() == [0.25]


def test_empty_step_commit_clears_it(store):
    commit_step(store, {"run_id": "r", "step": 7}, rows(2, "x"))
    commit_step(store, {"run_id": "r", "step": 7}, [])
    r = open_store(store)
    assert r.steps("r") == [] and r.step("r", 7).num_rows == 0
    assert r.evaluations().column("n_specimens").to_pylist() == [2, 0]


def test_newer_major_format_is_refused(store):
    commit_step(store, {"run_id": "r", "step": 1}, rows(1, "x"))
    DeltaTable(table_uri(store, "predictions")).alter.set_table_properties(
        {FORMAT_KEY: "2.0"}, raise_if_not_exists=False
    )
    with pytest.raises(StoreError) as err:
        open_store(store)
    msg = str(err.value)
    assert "predictions" in msg and store in msg and "2.0" in msg and FORMAT_VERSION in msg
    with pytest.raises(StoreError, match="2.0"):
        commit_step(store, {"run_id": "r", "step": 2}, rows(1, "x"))


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a vieval store"):
        open_store(str(tmp_path / "missing"))
    plain = tmp_path / "plain"
    DeltaTable.create(str(plain / "predictions"), pa.schema([("a", pa.int64())]))
    with pytest.raises(StoreError, match="not a vieval store"):
        open_store(str(plain))


def test_older_compatible_store_opens_and_accepts_writes(tmp_path):
    """A same-major store written before later columns/tables existed still works."""
    root = str(tmp_path / "old")
    legacy = pa.schema(
        [
            ("run_id", pa.string()),
            ("step", pa.int64()),
            ("eval_id", pa.string()),
            ("specimen_id", pa.string()),
            ("raw_text", pa.string()),
        ]
    )
    for name, schema, parts in [
        ("predictions", legacy, ["step"]),
        (
            "evaluations",
            pa.schema(
                [
                    ("eval_id", pa.string()),
                    ("run_id", pa.string()),
                    ("step", pa.int64()),
                    ("status", pa.string()),
                ]
            ),
            None,
        ),
        ("specimens", pa.schema([("specimen_id", pa.string())]), None),
    ]:
        DeltaTable.create(
            table_uri(root, name),
            schema,
            partition_by=parts,
            configuration={FORMAT_KEY: "1.0" if name != "specimens" else "1.9"},
            raise_if_key_not_exists=False,
        )
    from deltalake import write_deltalake

    write_deltalake(
        table_uri(root, "predictions"),
        pa.table(
            {
                "run_id": ["r"],
                "step": [5],
                "eval_id": ["e"],
                "specimen_id": ["a"],
                "raw_text": ["hi"],
            }
        ),
        mode="append",
    )
    # its evaluation row: the step's commit marker, as every writer has always appended
    write_deltalake(
        table_uri(root, "evaluations"),
        pa.table({"eval_id": ["e"], "run_id": ["r"], "step": [5], "status": ["ok"]}),
        mode="append",
    )
    r = open_store(root)
    got = r.step("r", 5)
    assert got.column("raw_text").to_pylist() == ["hi"]
    assert got.column("input_width").to_pylist() == [None]  # a later column reads as null
    assert r.training_log("r").num_rows == 0  # a later table reads as empty
    commit_step(root, {"run_id": "r", "step": 6, "f1": 0.5}, rows(1, "new"))
    r.refresh()
    assert r.step("r", 6).column("input_width").to_pylist() == [448]
    assert r.aggregates("r").column("f1").to_pylist() == [None, 0.5]  # steps 5, 6


def test_specimens_written_once_per_dataset_version_with_thumbnail(store, tmp_path):
    path = tmp_path / "wide.png"
    path.write_bytes(png_bytes(1200, 300))
    specs = [
        Specimen(
            "b.png", "vqa", "what colour?", 1200, 300, image_path=str(path), ref_answers=["green"]
        ),
        Specimen("a.png", "grounding", "cat", 40, 30, image_bytes=png_bytes(40, 30)),
    ]
    assert write_specimens(store, specs, "v1", thumb_px=256) is True
    assert write_specimens(store, specs, "v1", thumb_px=256) is False
    assert write_specimens(store, specs[:1], "v2", thumb_px=256) is True
    r = open_store(store)
    table = r.specimens()
    assert table.num_rows == 3 and "image_bytes" not in table.column_names
    assert r.specimens(dataset_version="v1").column("specimen_id").to_pylist() == ["a.png", "b.png"]
    row = r.specimens(dataset_version="v1").to_pylist()[1]
    assert row["ref_answers"] == ["green"] and row["image_path"] == str(path)
    jpeg = r.specimen_image("b.png")
    assert jpeg[:2] == b"\xff\xd8"
    img = Image.open(io.BytesIO(jpeg))
    assert max(img.size) <= 256 and img.size == (256, 64)
    assert Image.open(io.BytesIO(r.specimen_image("a.png"))).size == (40, 30)  # never upscaled
    assert r.specimen_image("missing.png") is None
    with pytest.raises(DataError, match="specimen 'gone'.*gone.png"):
        write_specimens(
            store, [Specimen("gone", "vqa", "q", 1, 1, image_path=str(tmp_path / "gone.png"))], "v3"
        )


def test_training_log_replaces_run_rows(store):
    history = [
        {"step": 10, "loss": 2.5, "learning_rate": 1e-4, "epoch": 0.1, "grad_norm": 3.0},
        {"step": 10, "eval_loss": 2.7, "eval_runtime": 1.5, "epoch": 0.1},
        {"step": 20, "train_runtime": 9.0, "train_loss": 2.0},
    ]
    write_training_log(store, "r", history)
    write_training_log(store, "other", history[:1])
    write_training_log(store, "r", history[:2])
    r = open_store(store)
    log = r.training_log("r")
    assert log.column("step").to_pylist() == [10, 10]
    assert sorted(x for x in log.column("loss").to_pylist() if x is not None) == [2.5]
    assert 2.7 in log.column("eval_loss").to_pylist()
    assert any(json.loads(v).get("eval_runtime") == 1.5 for v in log.column("values").to_pylist())
    assert r.training_log("other").num_rows == 1
    with pytest.raises(StoreError, match="entry 0 has no integer step"):
        write_training_log(store, "r", [{"loss": 1.0}])


def test_compact_and_vacuum_keep_time_travel_inside_window(store):
    versions = [
        commit_step(store, {"run_id": "r", "step": s % 3}, rows(5, f"t{s}")) for s in range(6)
    ]
    report = compact(store)
    assert report["predictions"]["files_vacuumed"] == 0  # everything is inside the 7-day window
    assert report["evaluations"]["files_removed"] >= 6
    old = open_store(store, as_of=versions[0])
    assert old.step("r", 0).column("raw_text").to_pylist()[0] == "t0 0"
    latest = open_store(store)
    assert [latest.step("r", s).num_rows for s in range(3)] == [5, 5, 5]
    assert latest.step("r", 0).column("raw_text")[0].as_py() == "t3 0"
    assert latest.evaluations().num_rows == 6

    with pytest.raises(StoreError, match="force=True"):
        compact(store, retention_hours=0)
    report = compact(store, retention_hours=0, force=True)
    assert report["predictions"]["files_vacuumed"] >= 3
    with pytest.raises(StoreError):
        open_store(store, as_of=versions[0]).step("r", 0)
    assert open_store(store).step("r", 0).num_rows == 5


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_polars_and_duckdb_read_the_tables_without_this_package(store):
    commit_step(store, {"run_id": "r", "step": 100}, rows(4, "a"))
    commit_step(store, {"run_id": "r", "step": 200}, rows(4, "b"))
    commit_step(store, {"run_id": "r", "step": 100}, rows(4, "c"))  # replaced files stay on disk
    code = f"""
        import sys, polars as pl, duckdb
        from deltalake import DeltaTable
        root = {store!r}
        df = pl.read_delta(root + "/predictions")
        assert df.height == 8, df.height
        assert sorted(df.filter(pl.col("step") == 100)["raw_text"].to_list())[0] == "c 0"
        lazy = pl.scan_delta(root + "/evaluations").select("step", "status").collect()
        assert lazy.height == 3
        files = DeltaTable(root + "/predictions").file_uris()
        n = duckdb.sql("SELECT count(*) FROM read_parquet($f, hive_partitioning=true) WHERE step = 100",
                       params={{"f": files}}).fetchall()[0][0]
        assert n == 4, n
        globbed = duckdb.sql(f"SELECT count(*) FROM read_parquet('{{root}}/predictions/**/*.parquet')").fetchall()[0][0]
        assert globbed == 12, globbed  # why readers must go through the log
        assert "vieval_runner" not in sys.modules
        print("ok")
    """
    out = _run(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_reading_process_exits_cleanly(store):
    """The exit-134 trap: reading must not go through deltalake's pyarrow dataset path."""
    write_specimens(store, [Specimen("s000", "vqa", "q", 8, 8, image_bytes=png_bytes(8, 8))], "v1")
    for s in (100, 200, 300):
        commit_step(store, {"run_id": "r", "step": s}, rows(20, f"t{s}"))
    code = f"""
        from vieval_runner.store import open_store
        r = open_store({store!r})
        assert r.steps("r") == [100, 200, 300]
        assert r.step("r", 200).num_rows == 20
        assert r.specimen_history("r", "s005").num_rows == 3
        assert r.aggregates("r").num_rows == 3 and r.specimen_image("s000")
        r.specimens(); r.training_log("r"); r.refresh()
        print("done")
    """
    for _ in range(3):
        out = _run(code)
        assert (out.returncode, out.stdout.strip()) == (0, "done"), out.stderr


def test_prediction_records_and_a_tiny_cache(store):
    from vieval_runner.records import Prediction
    from vieval_runner.store import prediction_row

    preds = [
        Prediction(
            f"s{i}",
            f"<box>{i}</box>",
            "ok",
            [Box(0, 0, i + 1, 1, "x")],
            metrics={"tp": 1, "fp": 0, "fn": 0, "f1": 1.0, "iou_mean": 0.5},
            failure_category="good",
            input_size=(224, 224),
        )
        for i in range(3)
    ]
    for step in (0, 10, 20):
        commit_step(store, {"run_id": "r", "step": step}, [prediction_row(p) for p in preds])
    small = open_store(store, cache_bytes=1)  # nothing fits: every call must still be right
    big = open_store(store)
    for reader in (small, big):
        hist = reader.specimen_history("r", "s2")
        assert hist.column("step").to_pylist() == [0, 10, 20]
        assert hist.column("pred_boxes").to_pylist()[0][0]["x2"] == 3.0
        assert hist.column("tp").to_pylist() == [1, 1, 1]
        assert hist.column("input_height").to_pylist() == [224] * 3
        assert [reader.step("r", s).num_rows for s in (0, 10, 20)] == [3, 3, 3]
    assert small._histories["r"][1] is None and big._histories["r"][1] is not None


def test_token_columns_are_nullable_and_added_to_stores_without_them(tmp_path):
    """``token_logprobs`` / ``token_ends`` (per-box scores, ``vieval rescore``): a store made
    before they existed opens (null) and takes them on the next commit; box structs keep
    their columns (a box's text span is not stored)."""
    from deltalake import write_deltalake

    from vieval_runner.records import Prediction
    from vieval_runner.store import EVALUATIONS_SCHEMA, PREDICTIONS_SCHEMA, prediction_row

    root = str(tmp_path / "before")
    create_store(root)
    older = pa.schema([f for f in PREDICTIONS_SCHEMA if not f.name.startswith("token_")])
    DeltaTable.create(
        table_uri(root, "predictions"),
        older,
        mode="overwrite",
        partition_by=["step"],
        configuration={FORMAT_KEY: FORMAT_VERSION},
        raise_if_key_not_exists=False,
    )
    plain = {name: None for name in older.names}
    plain.update(run_id="r", step=1, eval_id="e", specimen_id="a", raw_text="[]")
    write_deltalake(
        table_uri(root, "predictions"), pa.Table.from_pylist([plain], older), mode="append"
    )
    marker = {"eval_id": "e", "run_id": "r", "step": 1, "status": "ok"}
    write_deltalake(
        table_uri(root, "evaluations"),
        pa.Table.from_pylist([marker], EVALUATIONS_SCHEMA),
        mode="append",
    )
    reader = open_store(root)
    assert reader.step("r", 1).column("token_logprobs").to_pylist() == [None]

    text = '[{"bbox_2d": [1, 2, 3, 4]}]'
    scored = Prediction(
        "a", text, "ok", [Box(1, 2, 3, 4, "x", 0.25, span=(1, len(text) - 1))],
        confidence=0.25, token_logprobs=[-1.5, -0.125], token_ends=[3, len(text)],
    )  # fmt: skip
    commit_step(root, {"run_id": "r", "step": 2}, [prediction_row(scored)])
    reader.refresh()
    step = reader.step("r", 2)
    assert step.schema.field("token_logprobs").type == pa.list_(pa.float32())
    assert step.schema.field("token_ends").type == pa.list_(pa.int32())
    row = step.to_pylist()[0]
    assert (row["token_logprobs"], row["token_ends"]) == ([-1.5, -0.125], [3, len(text)])
    assert set(row["pred_boxes"][0]) == {"x1", "y1", "x2", "y2", "label", "score"}
    assert reader.step("r", 1).column("token_ends").to_pylist() == [None]
