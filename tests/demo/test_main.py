"""`vieval demo`: real fine-tuning on the CPU, then the runner shows the model learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vieval_runner import cli, store
from vieval_runner.config import ConfigError
from vieval_runner.demo import main as demo
from vieval_runner.demo.training import TrainSettings


def _curve(store_path: str, run_id: str, metric: str) -> list[tuple[int, float]]:
    rows = store.open_store(store_path).aggregates(run_id).to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    return [(r["step"], r[metric]) for r in rows]


def _assert_learns(curve: list[tuple[int, float]], start_max: float, end_min: float) -> None:
    steps = [s for s, _ in curve]
    values = [v for _, v in curve]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 5, steps
    assert values[0] <= start_max, curve
    assert values[-1] >= end_min, curve
    # the slider shows learning: some step lies in between, the later half beats the earlier
    assert any(values[0] < v < values[-1] for v in values[1:-1]), curve
    half = len(values) // 2
    assert sum(values[half:]) / (len(values) - half) > sum(values[:half]) / half + 0.2, curve
    # monotone-ish: no step loses more than 0.2 of what the previous one had
    assert all(b >= a - 0.2 for a, b in zip(values, values[1:], strict=False)), curve


def _assert_trainer_layout(out: Path, settings: TrainSettings) -> None:
    for name in ("run", "base", "data", "store", "config.yaml"):
        assert (out / name).exists(), name
    assert (out / "data" / "val.jsonl").is_file() and (out / "data" / "train.jsonl").is_file()
    val = {json.loads(line)["image"] for line in (out / "data/val.jsonl").read_text().splitlines()}
    train = {
        json.loads(line)["image"] for line in (out / "data/train.jsonl").read_text().splitlines()
    }
    assert not val & train  # the evaluation split is held out
    expected = list(range(settings.save_steps, settings.max_steps + 1, settings.save_steps))
    found = sorted(int(p.name.split("-")[1]) for p in (out / "run").glob("checkpoint-*"))
    assert found == expected
    last = out / "run" / f"checkpoint-{settings.max_steps}"
    assert (last / "model.safetensors").is_file()
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(eval_losses) == len(expected)
    assert losses[-1] < losses[0] / 3 and eval_losses[-1] < eval_losses[0]


@pytest.mark.slow
def test_grounding_demo_learns_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    status = cli.main(["demo", "--no-view", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 0
    assert lines[-1] == str(out / "store")
    _assert_trainer_layout(out, demo.default_settings("grounding"))
    curve = _curve(lines[-1], "demo-grounding", "f1")
    _assert_learns(curve, start_max=0.1, end_min=0.6)
    # the Trainer's real log history reached the store next to the metrics
    log = store.open_store(lines[-1]).training_log("demo-grounding").to_pylist()
    assert any(r.get("eval_loss") is not None for r in log)


@pytest.mark.slow
def test_vqa_demo_learns(tmp_path, capsys):
    # smaller than the README's `--task vqa` (1200 steps) to keep CI short; same thresholds
    settings = TrainSettings(max_steps=800, save_steps=160)
    out = tmp_path / "vqa"
    status = demo.main(task="vqa", out=str(out), view=False, settings=settings, n_train=1500)
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 0 and lines[-1] == str(out / "store")
    _assert_trainer_layout(out, settings)
    _assert_learns(_curve(lines[-1], "demo-vqa", "exact_match"), start_max=0.2, end_min=0.7)


def test_demo_training_is_deterministic(tmp_path):
    settings = TrainSettings(max_steps=6, save_steps=3, batch_size=4, logging_steps=3)

    def train(name: str, seed: int) -> tuple[bytes, list]:
        out = tmp_path / name
        demo.build_demo(out, "grounding", seed=seed, settings=settings, n_train=24)
        ckpt = out / "run" / "checkpoint-6"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        losses = [h.get("loss", h.get("eval_loss")) for h in state["log_history"]]
        return (ckpt / "model.safetensors").read_bytes(), losses

    first, again, other = train("a", 0), train("b", 0), train("c", 1)
    assert first == again
    assert first[0] != other[0]

    # the same demo again reuses the trained run; another task or seed in that folder is refused
    weights = tmp_path / "a" / "run" / "checkpoint-6" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    demo.build_demo(tmp_path / "a", "grounding", seed=0, settings=settings, n_train=24)
    assert weights.stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="choose another --out"):
        demo.build_demo(tmp_path / "a", "grounding", seed=1, settings=settings, n_train=24)
    assert cli.main(["demo", "--no-view", "--task", "vqa", "--out", str(tmp_path / "a")]) == 2
