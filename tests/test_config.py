"""Config loading: YAML + dotted overrides, validation with messages that name the key."""

from pathlib import Path

import pytest

from vieval_runner.config import ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
run_dir: run
base_model: base
store: store
task: grounding
data:
  path: data/val.jsonl
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_example_configs_validate():
    for name in ("grounding.yaml", "vqa.yaml"):
        config = load_config(REPO / "configs" / name)
        assert config.data.path


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.run_dir == str((tmp_path / "run").resolve())
    assert config.store == str((tmp_path / "store").resolve())
    assert config.data.path == str((tmp_path / "data/val.jsonl").resolve())
    # a base model name that is no local folder stays as given (hub-style id)
    assert config.base_model == "base"
    assert config.effective_run_id == "run"


def test_overrides_are_yaml_values(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL),
        ["batch_size=16", "steps=[0, 200]", "data.strict=false", "scoring.iou_threshold=0.3"],
    )
    assert config.batch_size == 16
    assert config.steps == [0, 200]
    assert config.data.strict is False
    assert config.scoring.iou_threshold == 0.3


def test_unknown_key_names_the_key_and_allowed_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + "batch_sise: 4\n"))
    message = str(err.value)
    assert "config.yaml" in message and "'batch_sise'" in message and "batch_size" in message


def test_unknown_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'data.colums'.*columns"):
        load_config(write(tmp_path, MINIMAL), ["data.colums={}"])


def test_wrong_type_and_literal(tmp_path):
    with pytest.raises(ConfigError, match="'batch_size'"):
        load_config(write(tmp_path, MINIMAL), ["batch_size=lots"])
    with pytest.raises(ConfigError, match=r"'task'.*grounding.*vqa"):
        load_config(write(tmp_path, MINIMAL), ["task=detection"])
    with pytest.raises(ConfigError, match="'device'"):
        load_config(write(tmp_path, MINIMAL), ["device=tpu"])


def test_ap_bootstrap_resamples_default_and_lower_bound(tmp_path):
    assert load_config(write(tmp_path, MINIMAL)).scoring.ap_bootstrap_resamples == 200
    ok = load_config(write(tmp_path, MINIMAL), ["scoring.ap_bootstrap_resamples=50"])
    assert ok.scoring.ap_bootstrap_resamples == 50
    with pytest.raises(ConfigError, match="ap_bootstrap_resamples"):
        load_config(write(tmp_path, MINIMAL), ["scoring.ap_bootstrap_resamples=49"])


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'store'"):
        load_config(write(tmp_path, MINIMAL.replace("store: store\n", "")))


def test_steps_and_every_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="either 'steps' or 'every'"):
        load_config(write(tmp_path, MINIMAL), ["steps=[0]", "every=100"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["batch_size"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
