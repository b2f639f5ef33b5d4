"""Checkpoint discovery, completeness and hashing on real Trainer output and synthetic layouts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vieval_runner.checkpoints import (
    Checkpoint,
    checkpoint_hash,
    checkpoint_status,
    find_checkpoints,
    read_trainer_state,
)
from vieval_runner.records import CheckpointError

NOW = 1_000_000_000.0  # injected clock; synthetic files get mtimes relative to it


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 64, generator=g), "b.bias": torch.randn(64, generator=g)}


def _full(d: Path, *, state: bool = True, seed: int = 0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(seed), str(d / "model.safetensors"))
    if state:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    return d


def _age(d: Path, seconds: float) -> None:
    """Set every file's mtime to NOW - seconds."""
    for p in d.rglob("*"):
        os.utime(p, (NOW - seconds, NOW - seconds))


def _sharded(d: Path, *, drop: str | None = None) -> Path:
    d.mkdir(parents=True)
    t = _tensors()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({"a.weight": t["a.weight"]}, str(d / names[0]))
    save_file({"b.bias": t["b.bias"]}, str(d / names[1]))
    index = {"metadata": {}, "weight_map": {"a.weight": names[0], "b.bias": names[1]}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "trainer_state.json").write_text("{}")
    if drop:
        (d / drop).unlink()
    return d


# ---- real transformers.Trainer output -------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory) -> Path:
    """A genuine Trainer run dir: tiny GPT-2, save_steps=2, max_steps=6 -> checkpoint-2/4/6.

    transformers 5 always saves safetensors (the save_safetensors argument is gone).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (16, 12))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        save_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    return out


def test_real_trainer_layout(trainer_run: Path):
    (trainer_run / "runs").mkdir(exist_ok=True)  # tensorboard-style junk must be ignored
    cps = find_checkpoints(trainer_run, "gpt2-base")
    assert [c.step for c in cps] == [0, 2, 4, 6]
    assert cps[0] == Checkpoint(0, Path("gpt2-base"), "base", True, "")
    for c in cps[1:]:
        assert c.kind == "full" and c.complete, c.reason
        assert c.path == trainer_run / f"checkpoint-{c.step}"
        assert (c.path / "optimizer.pt").exists()  # it really is the Trainer's layout
        state = read_trainer_state(c.path)
        assert state is not None and state["global_step"] == c.step
    hashes = {checkpoint_hash(c.path) for c in cps[1:]}
    assert len(hashes) == 3  # training changed the weights at every save


def test_real_trainer_checkpoint_loses_weights(trainer_run: Path, tmp_path: Path):
    import shutil

    cp = shutil.copytree(trainer_run / "checkpoint-4", tmp_path / "checkpoint-4")
    (cp / "model.safetensors").unlink()
    # trainer_state.json is there, so the save is done: this is a corrupt checkpoint that
    # counts as complete (loading fails and is recorded), with the reason kept
    complete, reason = checkpoint_status(cp, 30, time.time())
    assert complete
    assert "no weights" in reason and "optimizer.pt" in reason
    (cp / "trainer_state.json").unlink()  # without it, and fresh: still being written
    complete, reason = checkpoint_status(cp, 30, time.time())
    assert not complete and "no weights" in reason and "settle time" in reason


# ---- synthetic layouts ----------------------------------------------------------------------


def test_folder_names_and_junk(tmp_path: Path):
    _full(tmp_path / "checkpoint-300")
    _full(tmp_path / "step_100")
    _full(tmp_path / "step-200")
    _full(tmp_path / "global_step500")
    _full(tmp_path / "checkpoint-final")
    _full(tmp_path / "checkpoint-100.tmp")
    (tmp_path / "runs").mkdir()
    (tmp_path / "checkpoint-400").write_text("a file, not a folder")
    cps = find_checkpoints(tmp_path, "base/model", now=NOW)
    assert [c.step for c in cps] == [0, 100, 200, 300, 500]
    assert [c.path.name for c in cps[1:]] == [
        "step_100",
        "step-200",
        "checkpoint-300",
        "global_step500",
    ]
    assert cps[0].kind == "base" and str(cps[0].path) == "base/model"
    assert find_checkpoints(tmp_path, "base", include_base=False, now=NOW)[0].step == 100


def test_duplicate_step_names_both(tmp_path: Path):
    _full(tmp_path / "checkpoint-100")
    _full(tmp_path / "step_100")
    with pytest.raises(CheckpointError, match=r"step 100.*checkpoint-100.*step_100"):
        find_checkpoints(tmp_path, "base")
    # leading zeros map to the same step too
    d = tmp_path / "z"
    _full(d / "step_0010")
    _full(d / "step-10")
    with pytest.raises(CheckpointError, match="step 10"):
        find_checkpoints(d, "base")


def test_selection_every_list_range(tmp_path: Path):
    for s in (50, 100, 150, 200, 300):
        _full(tmp_path / f"checkpoint-{s}")
    steps = lambda **kw: [c.step for c in find_checkpoints(tmp_path, "b", now=NOW, **kw)]  # noqa: E731
    assert steps() == [0, 50, 100, 150, 200, 300]
    assert steps(every=100) == [0, 100, 200, 300]  # step 0 kept with every
    assert steps(every=100, include_base=False) == [100, 200, 300]
    assert steps(steps=[200, 50]) == [50, 200]
    assert steps(steps=[0, 300], include_base=False) == [0, 300]  # explicit 0 selects the base
    assert steps(step_range=(100, 200)) == [100, 150, 200]  # inclusive
    assert steps(step_range=(None, 100)) == [0, 50, 100]
    assert steps(step_range=(150, None), every=150) == [150, 300]
    with pytest.raises(CheckpointError) as e:
        steps(steps=[100, 250])
    msg = str(e.value)
    assert str(tmp_path) in msg and "250" in msg and "[0, 50, 100, 150, 200, 300]" in msg
    with pytest.raises(CheckpointError, match="either"):
        steps(steps=[100], every=50)
    with pytest.raises(CheckpointError, match="positive"):
        steps(every=0)


def test_missing_run_dir_and_no_base(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoints(tmp_path / "nope", "b")
    _full(tmp_path / "checkpoint-10")
    assert [c.step for c in find_checkpoints(tmp_path, None, now=NOW)] == [10]
    with pytest.raises(CheckpointError, match=r"available steps: \[10\]"):
        find_checkpoints(tmp_path, None, steps=[0])


def test_real_step0_folder_wins_over_base(tmp_path: Path):
    _full(tmp_path / "checkpoint-0")
    cps = find_checkpoints(tmp_path, "base", now=NOW)
    assert len(cps) == 1 and cps[0].path.name == "checkpoint-0" and cps[0].kind == "full"


def test_sharded_complete_and_missing_shard(tmp_path: Path):
    assert checkpoint_status(_sharded(tmp_path / "ok"), 30, NOW) == (True, "")
    complete, reason = checkpoint_status(
        _sharded(tmp_path / "bad", drop="model-00002-of-00002.safetensors"), 30, NOW
    )
    assert complete and "missing shard" in reason and "00002-of-00002" in reason
    fresh = _sharded(tmp_path / "fresh", drop="model-00002-of-00002.safetensors")
    (fresh / "trainer_state.json").unlink()
    _age(fresh, 1)
    complete, reason = checkpoint_status(fresh, 30, NOW)
    assert not complete and "missing shard" in reason


def test_truncated_safetensors_incomplete_then_corrupt(tmp_path: Path):
    d = _full(tmp_path / "checkpoint-1")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    (d / "trainer_state.json").unlink()
    _age(d, 1)  # fresh and no trainer state: still being written
    complete, reason = checkpoint_status(d, 30, NOW)
    assert not complete and "model.safetensors is incomplete" in reason
    _age(d, 3600)  # settled long ago: corrupt, counts as complete so loading reports it
    complete, reason = checkpoint_status(d, 30, NOW)
    assert complete and "model.safetensors is incomplete" in reason
    f.write_bytes(data[:5])
    assert "truncated" in checkpoint_status(d, 30, NOW)[1]


def test_lora_adapter(tmp_path: Path):
    d = tmp_path / "checkpoint-20"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (d / "trainer_state.json").write_text("{}")
    complete, reason = checkpoint_status(d, 30, NOW)
    assert complete  # trainer state written: a broken adapter, reported when loading
    assert reason == "adapter_config.json present but adapter_model.safetensors missing"
    save_file(_tensors(), str(d / "adapter_model.safetensors"))
    (cp,) = find_checkpoints(tmp_path, "b", include_base=False, now=NOW)
    assert (cp.kind, cp.complete) == ("lora", True)
    h = checkpoint_hash(d)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 32}))
    assert checkpoint_hash(d) != h  # alpha changes the outputs, so it changes the hash


def test_only_optimizer_state(tmp_path: Path):
    d = tmp_path / "checkpoint-5"
    d.mkdir()
    (d / "optimizer.pt").write_bytes(b"x" * 10)
    (d / "scheduler.pt").write_bytes(b"x")
    (d / "trainer_state.json").write_text("{}")
    (cp,) = find_checkpoints(tmp_path, "b", include_base=False, now=NOW)
    assert cp.complete and "no weights" in cp.reason and "optimizer.pt, scheduler.pt" in cp.reason


def test_settle_time_without_trainer_state(tmp_path: Path):
    d = _full(tmp_path / "step_7", state=False)
    _age(d, 5)
    complete, reason = checkpoint_status(d, 30, NOW)
    assert not complete and "no trainer_state.json" in reason and "settle time 30" in reason
    _age(d, 31)
    assert checkpoint_status(d, 30, NOW) == (True, "")
    assert checkpoint_status(d, 60, NOW)[0] is False
    # trainer_state.json makes it complete at once, however fresh the files
    (d / "trainer_state.json").write_text("{}")
    _age(d, 0)
    assert checkpoint_status(d, 30, NOW) == (True, "")
    (cp,) = find_checkpoints(tmp_path, "b", include_base=False, settle_seconds=30, now=NOW)
    assert cp.complete


def test_hash_changes_on_any_byte_flip(tmp_path: Path):
    d = _full(tmp_path / "c")
    f = d / "model.safetensors"
    h0 = checkpoint_hash(d)
    assert h0 == checkpoint_hash(d) and len(h0) == 32
    data = bytearray(f.read_bytes())
    for pos in (len(data) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        f.write_bytes(flipped)
        assert checkpoint_hash(d) != h0
    f.write_bytes(data)
    assert checkpoint_hash(d) == h0
    # extra non-weight files do not change it; a renamed copy elsewhere hashes the same
    (d / "optimizer.pt").write_bytes(b"zz")
    assert checkpoint_hash(d) == h0
    assert checkpoint_hash(_full(tmp_path / "other")) == h0
    assert checkpoint_hash(_full(tmp_path / "seed1", seed=1)) != h0
    with pytest.raises(CheckpointError, match="no weight files"):
        checkpoint_hash(tmp_path / "missing")


def test_sharded_hash_covers_every_shard(tmp_path: Path):
    d = _sharded(tmp_path / "s")
    h0 = checkpoint_hash(d)
    f = d / "model-00002-of-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(data)
    assert checkpoint_hash(d) != h0


def test_read_trainer_state(tmp_path: Path):
    assert read_trainer_state(tmp_path) is None
    (tmp_path / "trainer_state.json").write_text('{"global_step": 40, "log_history": []}')
    assert read_trainer_state(tmp_path)["global_step"] == 40
    assert read_trainer_state(tmp_path / "trainer_state.json")["global_step"] == 40
    (tmp_path / "trainer_state.json").write_text('{"global_step": 40,')
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: malformed"):
        read_trainer_state(tmp_path)


def test_untaken_folders_names_checkpoint_like_entries_and_why(tmp_path):
    from vieval_runner.checkpoints import available_steps, untaken_folders

    for name in ("checkpoint-100", "checkpoint-final", "step_1200x", "global_step7", "runs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-200").write_text("a file")
    got = dict(untaken_folders(tmp_path))
    assert set(got) == {"checkpoint-final", "step_1200x", "checkpoint-200"}
    assert got["checkpoint-final"].startswith("'final' is not a step number")
    assert got["step_1200x"].startswith("'1200x' is not a step number")
    assert got["checkpoint-200"] == "a file, not a folder"
    assert available_steps(tmp_path) == [7, 100]
    assert untaken_folders(tmp_path / "missing") == [] and available_steps(tmp_path / "x") == []
