"""Setup checks: a config that cannot run exits 2 naming the setting, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from vieval_runner import cli
from vieval_runner.config import ConfigError
from vieval_runner.pipeline.preflight import check_base_model, check_device, check_store
from vieval_runner.testing.fixtures import write_split


def _config_file(tmp_path: Path, run, **extra) -> Path:
    data = write_split(tmp_path / "data", "grounding", n=2)
    tree = {
        "run_dir": str(run.run_dir),
        "base_model": str(run.base_model_dir),
        "store": str(tmp_path / "store"),
        "data": {"path": str(data)},
        "batch_size": 2,
        "max_new_tokens": 4,
        "device": "cpu",
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _run_exits_2_writing_nothing(tmp_path, config: Path, capsys, *needles: str) -> str:
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err
    store = tmp_path / "store"
    assert not (store / "logs").exists()  # no log folder for a config that never ran
    assert not (store / "evaluations").exists() and not (store / "predictions").exists()
    return err


def test_nonexistent_base_model_path_exits_2_before_writing(tmp_path, tiny_run, capsys):
    missing = tmp_path / "models" / "no-such-base"
    config = _config_file(tmp_path, tiny_run("qwen25_vl"), base_model=str(missing))
    _run_exits_2_writing_nothing(tmp_path, config, capsys, "base_model", str(missing))


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_absent_cuda_device_exits_2_before_writing(tmp_path, tiny_run, capsys):
    config = _config_file(tmp_path, tiny_run("qwen25_vl"), device="cuda:7")
    _run_exits_2_writing_nothing(tmp_path, config, capsys, "device: cuda:7")


def test_store_that_is_a_file_exits_2(tmp_path, tiny_run, capsys):
    config = _config_file(tmp_path, tiny_run("qwen25_vl"))
    (tmp_path / "store").write_text("not a store\n")
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "store:" in err and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "store").read_text() == "not a store\n"


def test_empty_steps_and_inverted_range_name_the_setting(tmp_path, tiny_run, capsys):
    run = tiny_run("qwen25_vl")
    err = _run_exits_2_writing_nothing(
        tmp_path, _config_file(tmp_path, run, steps=[]), capsys, "'steps'", "empty list"
    )
    assert "no checkpoints found" not in err
    err = _run_exits_2_writing_nothing(
        tmp_path,
        _config_file(tmp_path, run, step_range=[300, 100]),
        capsys,
        "'step_range'",
        "300 is after last step 100",
    )
    # a range past every checkpoint: the message names the range and what there is
    _run_exits_2_writing_nothing(
        tmp_path,
        _config_file(tmp_path, run, step_range=[400, 900]),
        capsys,
        "step_range=[400, 900]",
        "available steps: [100, 200, 300]",
    )


def test_check_functions_name_what_is_wrong(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_store(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_store(str(tmp_path / "file" / "store"))
    check_store(str(tmp_path / "new" / "store"))  # creatable
    check_store("s3://bucket/prefix")  # object stores: not checked here
    with pytest.raises(ConfigError, match="no config.json"):
        check_base_model(str(tmp_path))
    with pytest.raises(ConfigError, match="no such folder"):
        check_base_model("./relative/missing")
    # a well-formed hub id not in the (offline) cache
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        check_base_model("some-org/not-cached-model")
    check_device("cpu")
    check_device("auto")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            check_device("cuda")


def test_checkpoint_error_kept_for_missing_run_dir(tmp_path, tiny_run, capsys):
    config = _config_file(tmp_path, tiny_run("qwen25_vl"), run_dir=str(tmp_path / "no-run"))
    _run_exits_2_writing_nothing(tmp_path, config, capsys, "no-run")
