"""Smoke tests of scripts/bench_throughput.py at tiny sizes on the CPU, so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_throughput.py"
RATIO_LINE = re.compile(r"^c/a=\d+\.\d c/b=\d+\.\d\d$")


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_figures(result: dict, specimens: int, checkpoints: int, limit: int) -> None:
    assert result["complete"] is True
    samples = specimens * checkpoints
    for key in ("a_per_sample", "b_batched_hf", "c_vieval_run"):
        assert result[key]["samples"] == samples, key
        assert result[key]["samples_per_s"] > 0, key
    a = result["a_per_sample"]
    assert a["samples_timed"] == limit * checkpoints
    assert a["extrapolated"] is (limit < specimens)
    assert len(a["load_s"]) == len(a["generate_s"]) == checkpoints
    # fp32 on the CPU: batched and vieval outputs equal the one-at-a-time ones exactly
    assert result["texts_checked"] == limit * checkpoints
    assert result["b_mismatches"] == 0
    assert result["c_mismatches"] == 0
    c = result["c_vieval_run"]
    assert c["samples_per_s"] == pytest.approx(samples / c["seconds"])
    assert result["c_over_a"] == pytest.approx(c["samples_per_s"] / a["samples_per_s"])
    assert {"generate_s", "load_s"} <= set(c["breakdown_s"])


def test_compare_names_each_differing_sample():
    bench = _load_script()
    reference = {(100, "a.png"): "x", (100, "b.png"): "y", (200, "a.png"): "z"}
    other = {(100, "a.png"): "x", (100, "b.png"): "Y", (200, "a.png"): "z"}
    assert bench.compare(reference, other) == ["step 100 b.png"]
    assert bench.compare(reference, {}) == ["step 100 a.png", "step 100 b.png", "step 200 a.png"]
    assert bench.compare(reference, dict(reference)) == []


def test_shrink_needs_the_2b_preset():
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "tiny", "--shrink"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--specimens", "0"])


@pytest.mark.slow
def test_tiny_preset_as_a_script(tmp_path):
    """The real command line: the ratio line comes last and the JSON holds every figure."""
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(SCRIPT), "--specimens", "5", "--checkpoints", "2",
           "--batch-size", "3", "--max-new-tokens", "6", "--per-sample-limit", "3",
           "--device", "cpu", "--json", str(out), "--out", str(tmp_path / "work")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert RATIO_LINE.match(lines[-1]), lines[-5:]
    assert not [line for line in lines if line.startswith("WARNING")], lines
    result = json.loads(out.read_text())
    _check_figures(result, specimens=5, checkpoints=2, limit=3)
    assert result["preset"] == "tiny" and result["device"] == "cpu"
    assert result["a_per_sample"]["all_full_length"] is True
    assert result["b_batched_hf"]["all_full_length"] is True
    # --out keeps the work folder: the runner's store holds both steps
    assert (tmp_path / "work" / "store" / "predictions").is_dir()


@pytest.mark.slow
def test_shrunk_2b_preset_every_generation_is_full_length(tmp_path, capsys):
    """The GPU path (anchor model, 448 px images) at tiny dims: same code, every line run."""
    bench = _load_script()
    out = tmp_path / "figures.json"
    argv = ["--preset", "qwen2vl-2b", "--shrink", "--specimens", "4", "--checkpoints", "2",
            "--batch-size", "4", "--max-new-tokens", "5", "--per-sample-limit", "2",
            "--device", "cpu", "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert RATIO_LINE.match(lines[-1])
    result = json.loads(out.read_text())
    _check_figures(result, specimens=4, checkpoints=2, limit=2)
    # end tokens are suppressed in the anchor: every method does exactly the same work
    assert result["a_per_sample"]["all_full_length"] is True
    assert result["b_batched_hf"]["all_full_length"] is True
    assert result["fixture"]["image_px"] == 448
