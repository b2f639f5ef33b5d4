"""The `vieval` command line: parse, run, summary, exit statuses and their messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vieval_runner import cli

REPO = Path(__file__).resolve().parents[1]


def _vieval(
    *args: str, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="120")
    return subprocess.run(
        [sys.executable, "-m", "vieval_runner", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def test_parse_one_output_from_stdin():
    text = 'Sure! ```json\n[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}]\n```'
    done = _vieval(
        "parse",
        "--format",
        "qwen25_vl_json",
        "--image-size",
        "1000,800",
        "--input-size",
        "500,400",
        stdin=text,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "ok"
    assert result["boxes"] == [{"label": "cat", "box": [20.0, 40.0, 220.0, 440.0]}]


def test_parse_says_malformed_for_a_complete_text_and_truncated_with_the_flag():
    text = '[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6'  # an unclosed list
    args = ("parse", "--format", "qwen3_vl_json", "--image-size", "1000,1000")
    complete = json.loads(_vieval(*args, stdin=text).stdout)
    cut = json.loads(_vieval(*args, "--truncated", stdin=text).stdout)
    assert (complete["status"], cut["status"]) == ("malformed", "truncated")
    assert complete["boxes"] == cut["boxes"] == [{"label": "", "box": [1.0, 2.0, 3.0, 4.0]}]


def test_parse_jsonl_is_fast_and_imports_no_model_library():
    lines = [
        {
            "text": "<loc0256><loc0128><loc0768><loc0512> cat",
            "format": "paligemma_loc",
            "image_size": [1024, 512],
        },
        {"text": "nothing here", "format": "qwen3_vl_json", "image_size": [100, 100]},
        {"text": "x", "format": "no_such_format", "image_size": [100, 100]},
    ]
    code = (
        "import sys, io\n"
        "from vieval_runner import cli\n"
        f"sys.stdin = io.StringIO({''.join(json.dumps(x) + chr(10) for x in lines)!r})\n"
        "status = cli.main(['parse', '--jsonl'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'deltalake') if m in sys.modules]\n"
        "print('HEAVY', heavy, status)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip().splitlines()
    assert out[-1] == "HEAVY [] 0"
    first, second, third = (json.loads(line) for line in out[:3])
    assert first == {
        "status": "ok",
        "boxes": [{"label": "cat", "box": [128.0, 128.0, 512.0, 384.0]}],
    }
    assert second["status"] == "malformed" and second["boxes"] == []
    assert third["status"] == "error" and "no_such_format" in third["error"]


def test_parse_bad_arguments_exit_2(capsys):
    assert cli.main(["parse", "--format", "nope", "--image-size", "10,10"]) == 2
    assert "unknown format 'nope'" in capsys.readouterr().err


def _config_file(tmp_path: Path, run, **extra) -> Path:
    from vieval_runner.testing.fixtures import write_split

    data = write_split(tmp_path / "data", "grounding", n=4)
    tree = {
        "run_dir": str(run.run_dir),
        "base_model": str(run.base_model_dir),
        "store": str(tmp_path / "store"),
        "data": {"path": str(data)},
        "batch_size": 4,
        "max_new_tokens": 8,
        "device": "cpu",
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_bad_config_exits_2_naming_the_key(tmp_path, tiny_run, capsys):
    config = _config_file(tmp_path, tiny_run("qwen25_vl"), batch_sise=4)
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'batch_sise'" in err and str(config) in err
    assert cli.main(["run", str(config).replace("config", "nothing")]) == 2


def test_unknown_output_format_and_missing_run_dir_exit_2(tmp_path, tiny_run, capsys):
    run = tiny_run("qwen25_vl")
    config = _config_file(tmp_path, run, run_dir=str(tmp_path / "no-such-run"))
    assert cli.main(["run", str(config)]) == 2
    assert "no-such-run" in capsys.readouterr().err
    config = _config_file(tmp_path, run, output_format="yolo_txt")
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "yolo_txt" in err and "qwen25_vl_json" in err


def test_run_then_summary_json(tmp_path, tiny_run):
    config = _config_file(tmp_path, tiny_run("qwen25_vl"), steps=[0, 300])
    done = _vieval("run", str(config))
    assert done.returncode == 0, done.stderr + done.stdout
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == f"store: {tmp_path / 'store'}"
    assert "best checkpoint" in done.stdout
    # where the time went: 2 steps x 4 specimens generated, inputs prepared once
    (timing,) = [line for line in lines if line.startswith("time ")]
    assert "(8 samples," in timing and "inputs" in timing and "(once per run)" in timing
    again = _vieval("run", str(config), "--force")  # the same split: inputs reused
    assert again.returncode == 0, again.stderr + again.stdout
    assert "(reused)" in again.stdout
    logs = list((tmp_path / "store" / "logs").glob("vieval-*.log"))
    assert logs and "versions:" in logs[0].read_text()

    summary = _vieval("summary", str(tmp_path / "store"), "--json", timeout=120)
    assert summary.returncode == 0, summary.stderr
    payload = json.loads(summary.stdout)
    (run,) = payload["runs"]
    assert run["task"] == "grounding" and [s["step"] for s in run["steps"]] == [0, 300]
    assert all(s["n_specimens"] == 4 for s in run["steps"])
    # intervals: stored with the evaluation at commit, and recomputed by the summary
    assert all(len(s["f1_ci95"]) == 2 for s in run["steps"])
    from vieval_runner import store

    evals = store.open_store(str(tmp_path / "store")).evaluations().to_pylist()
    assert all(json.loads(e["ci95"])["f1"][0] <= e["f1"] for e in evals)
    f1 = {s["step"]: s["f1"] for s in run["steps"]}
    if f1[0] == f1[300]:  # a tie of the two: none is best (scoring.best_step)
        assert run["best_step"] is None
    else:
        assert run["best_step"] == max(f1, key=f1.get)


def test_failed_checkpoint_exit_3(tmp_path, tiny_run, capsys):
    import shutil

    source = tiny_run("qwen25_vl")
    run_dir = tmp_path / "run"
    shutil.copytree(source.run_dir, run_dir)
    (run_dir / "checkpoint-100" / "model.safetensors").write_bytes(b"not a safetensors file")
    run = type(source)(source.base_model_dir, run_dir, source.steps, source.family)
    config = _config_file(tmp_path, run, steps=[0, 100, 200])
    assert cli.main(["run", str(config)]) == 3
    out = capsys.readouterr().out
    assert "1 checkpoint(s) failed" in out and "100" in out


def test_bad_data_exits_2_naming_file_and_row(tmp_path, tiny_run, capsys):
    config = _config_file(tmp_path, tiny_run("qwen25_vl"))
    data = tmp_path / "data" / "val.jsonl"
    lines = data.read_text().splitlines()
    lines[2] = lines[2].replace('"image": "', '"image": "missing-')
    data.write_text("\n".join(lines) + "\n")
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "line 3" in err and "missing-" in err
    assert not (tmp_path / "store" / "predictions").exists()  # nothing written on bad input
    # strict: false skips the bad row, says which, and evaluates the rest
    assert cli.main(["run", str(config), "data.strict=false", "steps=[0]"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad rows" in out and "line 3" in out


def test_no_checkpoints_found_exits_2(tmp_path, tiny_run, capsys):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    config = _config_file(tmp_path, tiny_run("qwen25_vl"), run_dir=str(empty), include_base=False)
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint folders" in err and str(empty) in err


def test_export_of_a_missing_store_exits_2_and_export_prints_one_index_path(
    tmp_path, tiny_run, capsys
):
    missing = tmp_path / "no-store"
    assert cli.main(["export", str(missing), "--html", str(tmp_path / "html")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not a vieval store" in err
    assert not (tmp_path / "html").exists()
    # a real store: the printed path is the index.html that was written, once
    config = _config_file(tmp_path, tiny_run("qwen25_vl"), steps=[0])
    assert cli.main(["run", str(config)]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "store"), "--html", str(tmp_path / "html")]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"exported: {tmp_path / 'html' / 'index.html'}"
    assert (tmp_path / "html" / "index.html").is_file()


def _copy_run(tmp_path: Path, source):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(source.run_dir, run_dir)
    return type(source)(source.base_model_dir, run_dir, source.steps, source.family), run_dir


def test_untaken_checkpoint_folders_and_incomplete_steps_are_reported(tmp_path, tiny_run, capsys):
    import shutil

    run, run_dir = _copy_run(tmp_path, tiny_run("qwen25_vl"))
    shutil.copytree(run_dir / "checkpoint-100", run_dir / "checkpoint-final")
    shutil.copytree(run_dir / "checkpoint-100", run_dir / "step_1200x")
    (run_dir / "runs").mkdir()  # TensorBoard logs: not checkpoint-like, not mentioned
    # step 300 still being written: no trainer state yet and files just changed
    (run_dir / "checkpoint-300" / "trainer_state.json").unlink()
    config = _config_file(tmp_path, run, step_range=[100, 300], include_base=False)
    assert cli.main(["run", str(config), "watch.settle_seconds=3600"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "folder checkpoint-final not taken: 'final' is not a step number" in out
    assert "folder step_1200x not taken: '1200x' is not a step number" in out
    assert "runs not taken" not in out
    assert "evaluated steps [100, 200], skipped (already stored) [], not complete yet [300]" in out
    (log,) = (tmp_path / "store" / "logs").glob("vieval-*.log")
    assert "folder checkpoint-final not taken" in log.read_text()  # kept for later, too


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path, tiny_run):
    import signal
    import time

    config = _config_file(tmp_path, tiny_run("qwen25_vl"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vieval_runner", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        for line in proc.stdout:  # the run has started working on its checkpoints
            if line.startswith("run "):
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # 128 + SIGTERM, the shell's convention; the same message as Ctrl+C, no traceback
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM); the store keeps every step committed so far" in err
    assert "Traceback" not in err


def test_summary_ap_resamples_reach_the_ap_intervals(tmp_path, capsys):
    from vieval_runner import store
    from vieval_runner.records import Box
    from vieval_runner.scoring import intervals
    from vieval_runner.testing.stat_stores import build_stat_store

    specimens = build_stat_store(tmp_path / "st", n=60)

    def ap_ci95(*extra: str) -> list:
        assert cli.main(["summary", str(tmp_path / "st"), "--json", *extra]) == 0
        (run,) = json.loads(capsys.readouterr().out)["runs"]
        return next(s["ap_ci95"] for s in run["steps"] if s["step"] == 100)

    table = store.open_store(str(tmp_path / "st")).step("run", 100)
    preds = [[Box.from_row(b) for b in bs] for bs in table.column("pred_boxes").to_pylist()]
    refs = [s.ref_boxes for s in specimens]  # specimen ids sort as written
    fifty = intervals.ap_intervals(preds, refs, n_resamples=50)["ap"]
    assert ap_ci95("--ap-resamples", "50") == fifty
    assert ap_ci95() == intervals.ap_intervals(preds, refs)["ap"] != fifty
    # and the per-size AP of `--by size`
    assert cli.main(["summary", str(tmp_path / "st"), "--json", "--by", "size", "--run", "run",
                     "--ap-resamples", "50"]) == 0  # fmt: skip
    rows = [r for r in json.loads(capsys.readouterr().out) if r["step"] == 100]
    for row in rows:
        got = intervals.ap_intervals(preds, refs, n_resamples=50, area=row["slice"])
        assert row["ap_ci95"] == got["ap"], row["slice"]


def test_compare_two_steps_json_and_bad_step(tmp_path):
    from scipy.stats import binomtest

    from vieval_runner import store
    from vieval_runner.testing.stat_stores import build_stat_store

    build_stat_store(tmp_path / "st", n=120)
    done = _vieval("compare", str(tmp_path / "st"), "0", "100", "--metric", "acc_at_50", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    keys = {"metric", "step_a", "step_b", "n", "difference", "ci95", "p_value", "test", "better",
            "worse", "unchanged"}  # fmt: skip
    assert keys <= set(got) and got["step_a"] == 0 and got["step_b"] == 100
    # reference: McNemar's discordant counts from the stored rows, scipy's exact binomial test
    reader = store.open_store(str(tmp_path / "st"))
    a = reader.step("run", 0).column("acc_at_50").to_pylist()
    b = reader.step("run", 100).column("acc_at_50").to_pylist()
    better = sum(x == 0 and y == 1 for x, y in zip(a, b, strict=True))
    worse = sum(x == 1 and y == 0 for x, y in zip(a, b, strict=True))
    assert (got["better"], got["worse"], got["n"]) == (better, worse, 120)
    assert got["p_value"] == binomtest(better, better + worse, 0.5).pvalue
    assert abs(got["difference"] - (sum(b) - sum(a)) / 120) < 1e-12
    assert got["ci95"][0] < got["difference"] < got["ci95"][1]

    text = _vieval("compare", str(tmp_path / "st"), "200", "run:300")
    assert text.returncode == 0, text.stderr
    assert "step 300 minus step 200 on 120 shared specimens" in text.stdout
    assert "not significant at 0.05" in text.stdout

    bad = _vieval("compare", str(tmp_path / "st"), "0", "999")
    assert bad.returncode == 2 and "has no step 999" in bad.stderr


@pytest.mark.parametrize(
    ("command", "flag", "value", "low"),
    [("summary", "--resamples", "0", 100), ("summary", "--ap-resamples", "49", 50),
     ("compare", "--resamples", "-5", 100), ("summary", "--seed", "-1", 0)],
)  # fmt: skip
def test_bootstrap_counts_below_the_config_minimum_are_refused(command, flag, value, low, capsys):
    args = [command, "some-store", *(["0", "100"] if command == "compare" else []), flag, value]
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2  # argparse's usage error, before any store is opened
    assert f"argument {flag}: must be at least {low}, got {value}" in capsys.readouterr().err
