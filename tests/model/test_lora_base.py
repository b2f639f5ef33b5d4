"""A LoRA adapter evaluated on another base than it was trained on is said, stored and,
with ``lora.require_same_base``, a failed checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from vieval_runner import cli
from vieval_runner.model.lora_base import adapter_base, base_mismatch
from vieval_runner.store import open_store
from vieval_runner.testing.fixtures import write_split


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Another tiny qwen2_vl base: the same architecture and shapes, other weights (seed 1)."""
    from vieval_runner.testing.tiny_models import write_base

    _, _, base = write_base(tmp_path_factory.mktemp("other"), "qwen2_vl", seed=1)
    return base


def _with_recorded_base(tmp_path, run, recorded: str):
    adapter = tmp_path / "checkpoint-100"
    shutil.copytree(run.run_dir / "checkpoint-100", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = recorded
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def test_recorded_base_is_compared_by_folder_weights_and_name(tiny_lora_run, other_base, tmp_path):
    run = tiny_lora_run("qwen2_vl")
    adapter = run.run_dir / "checkpoint-100"
    # peft's save_pretrained wrote the base the adapter was trained on
    assert adapter_base(adapter) == str(run.base_model_dir)
    assert base_mismatch(adapter, run.base_model_dir) is None
    # a copy of the same base elsewhere: the same content hash
    copy = tmp_path / "copy-of-base"
    shutil.copytree(run.base_model_dir, copy)
    assert base_mismatch(adapter, copy) is None
    # another base of the same architecture: different weights, named with both hashes
    problem = base_mismatch(adapter, other_base)
    assert problem is not None
    assert str(run.base_model_dir) in problem and str(other_base) in problem
    assert "different weights" in problem and "content hash" in problem
    # the recorded base is a hub id not present here: compared by model name
    named = _with_recorded_base(tmp_path / "a", run, "Qwen/Qwen2-VL-2B-Instruct")
    assert base_mismatch(named, "/models/Qwen2-VL-2B-Instruct") is None
    problem = base_mismatch(named, "/models/Qwen2-VL-7B-Instruct")
    assert "Qwen/Qwen2-VL-2B-Instruct" in problem and "different model names" in problem
    # nothing recorded: nothing to compare
    blank = _with_recorded_base(tmp_path / "b", run, "")
    assert adapter_base(blank) is None and base_mismatch(blank, other_base) is None


def _config(tmp_path, run, base, **extra):
    tree = {
        "run_dir": str(run.run_dir),
        "base_model": str(base),
        "store": str(tmp_path / "store"),
        "data": {"path": str(write_split(tmp_path / "data", "grounding", n=2))},
        "batch_size": 2,
        "max_new_tokens": 4,
        "device": "cpu",
        "steps": [100],
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _evaluations(store):
    rows = open_store(str(store)).evaluations().to_pylist()
    return {(r["step"], r["status"]): r for r in rows}


def test_mismatch_is_a_stored_warning_on_an_ok_evaluation(
    tiny_lora_run, other_base, tmp_path, capsys
):
    run = tiny_lora_run("qwen2_vl")
    assert cli.main(["run", str(_config(tmp_path, run, other_base))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning step 100: LoRA adapter" in out and "different weights" in out
    row = _evaluations(tmp_path / "store")[(100, "ok")]
    (warning,) = json.loads(row["warnings"])
    assert str(run.base_model_dir) in warning and str(other_base) in warning


def test_require_same_base_fails_the_checkpoint(tiny_lora_run, other_base, tmp_path, capsys):
    run = tiny_lora_run("qwen2_vl")
    config = _config(tmp_path, run, other_base, lora={"require_same_base": True})
    assert cli.main(["run", str(config)]) == 3
    out = " ".join(capsys.readouterr().out.split())
    assert "1 checkpoint(s) failed" in out and "require_same_base" in out
    row = _evaluations(tmp_path / "store")[(100, "failed")]
    assert "different weights" in row["error"] and "lora.require_same_base is true" in row["error"]


def test_matching_base_stores_no_warning(tiny_lora_run, tmp_path):
    run = tiny_lora_run("qwen2_vl")
    config = _config(tmp_path, run, run.base_model_dir, lora={"require_same_base": True})
    assert cli.main(["run", str(config)]) == 0
    assert _evaluations(tmp_path / "store")[(100, "ok")]["warnings"] is None
