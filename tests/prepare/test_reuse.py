"""Prepared inputs reused across runs: real tiny models and processors, real Delta stores.

Processor calls are counted by wrapping the real processor class's ``__call__`` (it still runs).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from vieval_runner import data as data_mod
from vieval_runner import store
from vieval_runner.config import config_from_dict
from vieval_runner.model import loading as models
from vieval_runner.pipeline import run as runner
from vieval_runner.prepare import reuse as prepared_reuse
from vieval_runner.prepare import reuse_entries as entries
from vieval_runner.prepare.ram_budget import PreparedSet
from vieval_runner.testing.fixtures import make_specimens

FAMILY = "qwen2_vl"
# processor calls that prepare the 5-specimen split: one chunk, checked against its first and
# last specimen alone, then one call for the chunk
PREPARING_CALLS = 3
REUSED = "prepared inputs reused from "


def _split(folder: Path, n: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in make_specimens("vqa")[:n]:
        (folder / spec.specimen_id).write_bytes(spec.image_bytes)
        rows.append({"id": spec.specimen_id, "image": spec.specimen_id, "prompt": spec.prompt})
        rows[-1].update(task="vqa", answers=["red"])
    path = folder / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, run, store_name: str = "store", **extra):
    data = tmp_path / "data" / "val.jsonl"
    if not data.is_file():
        _split(data.parent)
    tree = {
        "run_dir": str(run.run_dir),
        "base_model": str(run.base_model_dir),
        "store": str(tmp_path / store_name),
        "task": "vqa",
        "data": {"path": str(data)},
        "steps": [0, 100],
        "batch_size": 4,
        "max_new_tokens": 6,
        "device": "cpu",
        "prepared_cache_dir": str(tmp_path / "prepared"),
        **extra,
    }
    return config_from_dict(tree)


@pytest.fixture
def calls(tiny_run, monkeypatch):
    """How many times the real processor ran (its class's ``__call__`` wrapped, not faked)."""
    from transformers import AutoProcessor

    cls = type(AutoProcessor.from_pretrained(str(tiny_run(FAMILY).base_model_dir)))
    real = cls.__call__
    count = [0]

    def counting(self, *args, **kwargs):
        count[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting)
    return count


def _run(config, caplog) -> list[str]:
    """Run; the vieval log lines about prepared inputs."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vieval"):
        outcome = runner.run(config, Console(quiet=True))
    assert outcome.exit_status == 0, outcome.failed
    gc.collect()  # the session's prepared set: its run folder goes with it
    return [m for m in caplog.messages if m.startswith("prepared ")]


def _texts(config) -> dict[int, list[tuple[str, str]]]:
    reader = store.open_store(config.store)
    run_id = config.effective_run_id
    return {
        step: sorted(
            (r["specimen_id"], r["raw_text"]) for r in reader.step(run_id, step).to_pylist()
        )
        for step in config.steps
    }


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / entries.MANIFEST).is_file())


def test_second_run_reuses_without_the_processor_and_stores_the_same(
    tmp_path, tiny_run, calls, caplog
):
    run = tiny_run(FAMILY)
    first = _config(tmp_path, run)
    lines = _run(first, caplog)
    assert calls[0] == PREPARING_CALLS
    root = tmp_path / "prepared"
    [entry] = _entries(root)
    # the run prepares, starts the first batch, and saves for reuse in the background
    assert lines == [lines[0], f"prepared inputs saved for reuse: {entry}"], lines
    assert lines[0].endswith(f"(saving for reuse in the background: {entry})"), lines

    calls[0] = 0
    again = first.model_copy(update={"store": str(tmp_path / "store2")})
    lines = _run(again, caplog)
    assert calls[0] == 0  # no image decoded, no processor run
    assert len(lines) == 1 and lines[0].startswith(f"{REUSED}{entry} (5 specimens, "), lines
    assert _texts(again) == _texts(first)
    forced = _run(first.model_copy(update={"force": True}), caplog)
    assert calls[0] == 0 and forced[0].startswith(REUSED)
    assert _texts(first) == _texts(again)
    # close() removed the run's links, never the entry
    assert _entries(root) == [entry]
    assert not list(root.glob("vieval-prepared-*")) and not list(root.glob(".tmp-*"))
    manifest = json.loads((entry / entries.MANIFEST).read_text())
    assert manifest["last_used"] > manifest["created"]
    assert manifest["ids"] == [f"img{i}.png" for i in range(5)]


def test_opened_entry_holds_the_same_tensors(tmp_path, tiny_run):
    run = tiny_run(FAMILY)
    config = _config(tmp_path, run, prepare_cache_ram_mb=0.001)  # some in RAM, most on disk
    loaded = models.load_base(run.base_model_dir, device="cpu")
    specimens = data_mod.load_specimens(config.data.path, "jsonl", "vqa").specimens
    made, line = prepared_reuse.prepare_reusing(loaded, specimens, config)
    assert "saved for reuse" in line
    reused, line = prepared_reuse.prepare_reusing(loaded, specimens, config)
    assert line.startswith(REUSED)
    assert reused.on_disk == len(reused) == len(made) == 5
    assert reused.prompt_lens == made.prompt_lens
    for a, b in zip(made, reused, strict=True):
        assert a.specimen_id == b.specimen_id and a.input_size == b.input_size
        assert torch.equal(a.input_ids, b.input_ids)
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # with room in RAM, a hit reads the entry once into memory (not once per batch)
    roomy = config.model_copy(update={"prepare_cache_ram_mb": 64})
    held, line = prepared_reuse.prepare_reusing(loaded, specimens, roomy)
    assert line.startswith(REUSED) and "5 in memory" in line and held.on_disk == 0
    for a, b in zip(made, held, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_template_image_and_processor_changes_are_misses(tmp_path, tiny_run, calls, caplog):
    run = tiny_run(FAMILY)
    config = _config(tmp_path, run, steps=[0])
    loaded = models.load_base(run.base_model_dir, device="cpu")
    specimens = data_mod.load_specimens(config.data.path, "jsonl", "vqa").specimens
    key = prepared_reuse.split_key(loaded, specimens)
    assert key == prepared_reuse.split_key(loaded, specimens)  # stable
    assert key != prepared_reuse.split_key(loaded, specimens, template="Q: {prompt}")
    assert key != prepared_reuse.split_key(loaded, specimens, system_prompt="Be brief.")
    assert key != prepared_reuse.split_key(loaded, specimens[:4])
    assert key != prepared_reuse.split_key(loaded, specimens, pixel_dtype=torch.bfloat16)

    # the processor's files: same content elsewhere is the same key, one changed file is not
    copy = tmp_path / "base_copy"
    shutil.copytree(run.base_model_dir, copy)
    other = models.load_base(copy, device="cpu")
    assert prepared_reuse.processor_source(other) == copy
    assert prepared_reuse.split_key(other, specimens) == key
    processor_config = copy / "processor_config.json"
    settings = json.loads(processor_config.read_text())
    processor_config.write_text(json.dumps(settings, indent=1))  # same settings, other bytes
    assert prepared_reuse.split_key(other, specimens) != key

    # end to end: run, change an image's bytes, run again: prepared again
    _run(config, caplog)
    assert calls[0] == PREPARING_CALLS
    image = Path(specimens[2].image_path)
    image.write_bytes(make_specimens()[7].image_bytes)
    changed = data_mod.load_specimens(config.data.path, "jsonl", "vqa").specimens
    assert prepared_reuse.split_key(loaded, changed) != key
    calls[0] = 0
    lines = _run(config.model_copy(update={"store": str(tmp_path / "s2")}), caplog)
    assert calls[0] == PREPARING_CALLS and "saved for reuse" in lines[-1]
    # and a template change through the config
    calls[0] = 0
    templated = config.model_copy(
        update={"store": str(tmp_path / "s3"), "prompt_template": "Answer: {prompt}"}
    )
    lines = _run(templated, caplog)
    assert calls[0] == PREPARING_CALLS and "saved for reuse" in lines[-1]
    assert len(_entries(tmp_path / "prepared")) == 3


def _corrupt_chunk(entry: Path) -> None:
    chunk = sorted(entry.glob("chunk-*.safetensors"))[0]
    data = chunk.read_bytes()
    chunk.unlink()  # a new inode: the runs' hard links keep the good bytes
    chunk.write_bytes(data[: len(data) // 2])


def _corrupt_manifest(entry: Path) -> None:
    manifest = entry / entries.MANIFEST
    manifest.write_text(manifest.read_text()[:40])


def _swap_tensors(entry: Path) -> None:
    """A chunk whose header parses and whose size matches, but whose tensor names do not."""
    from safetensors.torch import load_file, save_file

    chunk = sorted(entry.glob("chunk-*.safetensors"))[0]
    tensors = load_file(str(chunk))
    renamed = {f"9{name}": value for name, value in tensors.items()}
    chunk.unlink()
    save_file(renamed, str(chunk))
    manifest = json.loads((entry / entries.MANIFEST).read_text())
    manifest["chunks"][0]["bytes"] = chunk.stat().st_size
    (entry / entries.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [_corrupt_chunk, _corrupt_manifest, _swap_tensors])
def test_a_corrupt_entry_is_a_warning_and_is_prepared_again(
    tmp_path, tiny_run, calls, caplog, damage
):
    run = tiny_run(FAMILY)
    config = _config(tmp_path, run)
    _run(config, caplog)
    [entry] = _entries(tmp_path / "prepared")
    damage(entry)
    calls[0] = 0
    again = config.model_copy(update={"store": str(tmp_path / "store2")})
    lines = _run(again, caplog)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(entry) in w and "unusable prepared-inputs entry" in w for w in warnings)
    assert calls[0] == PREPARING_CALLS and lines[-1] == f"prepared inputs saved for reuse: {entry}"
    assert _texts(again) == _texts(config)
    calls[0] = 0
    third = _run(config.model_copy(update={"store": str(tmp_path / "store3")}), caplog)
    assert calls[0] == 0 and third[0].startswith(REUSED)  # the re-saved entry is good


def _tiny_config(tmp_path: Path, **extra):
    tree = {"run_dir": "r", "base_model": "b", "store": "s", "data": {"path": "d"}}
    tree.update(prepared_cache_dir=str(tmp_path / "prepared"), **extra)
    return config_from_dict(tree)


def test_background_save_returns_before_the_writes_and_saves_after(tmp_path, tiny_run, monkeypatch):
    """A run's first batch need not wait for the chunk writes (pixel values for later runs);
    the entry appears once they are done, and ``close()`` waits for it."""
    import threading

    import safetensors.torch

    run = tiny_run(FAMILY)
    loaded = models.load_base(run.base_model_dir, device="cpu")
    config = _tiny_config(tmp_path, prepare_cache_ram_mb=64)  # in RAM: writes only for reuse
    release, real = threading.Event(), safetensors.torch.save_file

    def slow_disk(*args, **kwargs):
        assert release.wait(30), "the test never released the writes"
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", slow_disk)
    prepared, line = prepared_reuse.prepare_reusing(
        loaded, make_specimens()[:4], config, background_save=True
    )
    key_dir = Path(line.rsplit("in the background: ", 1)[1].rstrip(")"))
    assert len(prepared) == 4 and not prepared.saving.done() and not key_dir.exists()
    assert prepared[3].specimen_id == "img3.png"  # usable while its chunks are being written
    release.set()
    assert prepared.saving.result(timeout=30) == f"saved for reuse: {key_dir}"
    assert (key_dir / entries.MANIFEST).is_file()
    prepared.close()
    again, line = prepared_reuse.prepare_reusing(loaded, make_specimens()[:4], config)
    assert line.startswith(REUSED) and len(again) == 4


def test_least_recently_used_entries_are_evicted(tmp_path, tiny_run):
    run = tiny_run(FAMILY)
    loaded = models.load_base(run.base_model_dir, device="cpu")
    specimens = make_specimens()
    splits = {"a": specimens[:3], "b": specimens[3:6], "c": specimens[6:]}
    roomy = _tiny_config(tmp_path)
    sizes = {}
    for name in ("a", "b"):
        _, line = prepared_reuse.prepare_reusing(loaded, splits[name], roomy)
        entry = Path(line.rsplit("saved for reuse: ", 1)[1].rstrip(")"))
        sizes[name] = json.loads((entry / entries.MANIFEST).read_text())["bytes"]
    _, line = prepared_reuse.prepare_reusing(loaded, splits["a"], roomy)  # a: used after b
    assert line.startswith(REUSED)
    keys = {n: prepared_reuse.split_key(loaded, s) for n, s in splits.items()}
    # room for a and c, not for b as well: b (least recently used) goes
    probe, _ = prepared_reuse.prepare_reusing(loaded, splits["c"], _tiny_config(tmp_path / "x"))
    sizes["c"] = sum(p.stat().st_size for p in probe.chunk_files)
    bound = (sizes["a"] + sizes["c"] + 16) / 2**30
    _, line = prepared_reuse.prepare_reusing(
        loaded, splits["c"], _tiny_config(tmp_path, prepared_cache_max_gb=bound)
    )
    assert "saved for reuse" in line
    left = {p.name for p in _entries(tmp_path / "prepared")}
    assert left == {keys["a"], keys["c"]}

    # a split larger than the bound is not kept at all (and nothing else is evicted for it)
    tiny = _tiny_config(tmp_path, prepared_cache_max_gb=sizes["a"] / 2 / 2**30)
    prepared, line = prepared_reuse.prepare_reusing(loaded, splits["b"], tiny)
    assert "not saved for reuse: larger than prepared_cache_max_gb" in line
    assert len(prepared) == 3 and {p.name for p in _entries(tmp_path / "prepared")} == left
    # estimated from the first specimen, so nothing of it was written (all fit in RAM)
    assert prepared.disk_bytes == 0 and not prepared.chunk_files


def test_concurrent_saves_of_one_key_leave_one_good_entry(tmp_path, tiny_run):
    """Two runs save the same key: one entry, no temp folder, and its tensors are the split's.
    The first set keeps everything in RAM with one chunk per specimen, so its chunks are the
    background-written kind; the second spills everything (written in line)."""
    from vieval_runner.prepare.inputs import prepare

    run = tiny_run(FAMILY)
    loaded = models.load_base(run.base_model_dir, device="cpu")
    specimens = make_specimens()[:4]
    root = tmp_path / "prepared"
    plain = prepare(loaded, specimens)
    in_ram = PreparedSet(2**30, tmp_path / "run0", chunk_bytes=1, persist_max_bytes=2**30)
    spilled = PreparedSet(0, tmp_path / "run1", persist_max_bytes=2**30)
    sets = [prepare(loaded, specimens, into=s) for s in (in_ram, spilled)]
    assert in_ram.on_disk == 0 and len(in_ram.chunk_files) == 4 and spilled.on_disk == 4
    saved = [prepared_reuse.save(s, root, "k") for s in sets]
    assert saved == [root / "k", root / "k"]
    assert [p.name for p in root.iterdir()] == ["k"]  # no half-written or temp folder left
    reopened = entries.open_entry(root / "k", tmp_path / "run3")
    assert len(reopened.chunk_files) == 4  # the first (background-written) save won
    for a, b in zip(plain, reopened, strict=True):
        assert a.specimen_id == b.specimen_id and torch.equal(a.input_ids, b.input_ids)
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_reuse_off_or_no_room_writes_nothing(tmp_path, tiny_run, calls, caplog):
    run = tiny_run(FAMILY)
    for i, extra in enumerate([{"reuse_prepared": False}, {"prepared_cache_max_gb": 0}]):
        config = _config(tmp_path, run, f"store{i}", steps=[0], **extra)
        calls[0] = 0
        lines = _run(config, caplog)
        assert calls[0] == PREPARING_CALLS
        assert lines and "saved for reuse" not in lines[0] and REUSED not in lines[0]
        assert not (tmp_path / "prepared").exists()


def test_default_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VIEVAL_CACHE_DIR", str(tmp_path / "v"))
    assert prepared_reuse.cache_root() == tmp_path / "v" / "prepared"
    assert prepared_reuse.cache_root(str(tmp_path / "c")) == tmp_path / "c"
    monkeypatch.delenv("VIEVAL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert prepared_reuse.cache_root() == tmp_path / "x" / "vieval" / "prepared"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert prepared_reuse.cache_root() == tmp_path / "h" / ".cache" / "vieval" / "prepared"


def test_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path, tiny_run):
    """A run killed before ``close()`` leaves its run folder; the next run on this host
    removes it. Live runs' folders and other hosts' (a shared home) stay."""
    import os
    import signal
    import subprocess
    import sys

    from vieval_runner.prepare.ram_budget import RUN_PREFIX, run_folder_name

    root = tmp_path / "prepared"
    root.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = run_folder_name().removeprefix(RUN_PREFIX).split("-")[0]
    killed = root / f"{RUN_PREFIX}{host}-{child.pid}-deadbeef0000"
    live = root / f"{RUN_PREFIX}{host}-{os.getpid()}-0123456789ab"
    other = root / f"{RUN_PREFIX}otherhost-{child.pid}-0123456789ab"
    for folder in (killed, live, other):
        folder.mkdir()
        (folder / "chunk-00000.safetensors").write_bytes(b"x" * 100)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    run = tiny_run(FAMILY)
    loaded = models.load_base(run.base_model_dir, device="cpu")
    prepared, _ = prepared_reuse.prepare_reusing(
        loaded, make_specimens()[:2], _tiny_config(tmp_path)
    )
    assert len(prepared) == 2
    assert not killed.exists() and live.exists() and other.exists()


def test_an_unusable_cache_folder_is_a_warning_not_a_failed_run(tmp_path, tiny_run, caplog):
    """A cache root that cannot be created (here: under a file; a read-only home alike)."""
    import logging

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = tiny_run(FAMILY)
    loaded = models.load_base(run.base_model_dir, device="cpu")
    config = _tiny_config(tmp_path).model_copy(
        update={"prepared_cache_dir": str(blocker / "prepared")}
    )
    with caplog.at_level(logging.WARNING, logger="vieval"):
        prepared, line = prepared_reuse.prepare_reusing(loaded, make_specimens()[:3], config)
    assert len(prepared) == 3 and "not saved for reuse" in line and "unusable" in line
    assert "prepared-inputs cache unusable" in caplog.text and str(blocker) in caplog.text


def test_a_bf16_run_keeps_its_pixels_in_bf16_under_its_own_key(tmp_path, tiny_run, caplog):
    """The prepared pixels follow the model's 16-bit dtype (half the bytes); an fp32 run on the
    same split does not reuse them."""
    run = tiny_run(FAMILY)
    half = _config(tmp_path, run, "store_bf16", dtype="bfloat16")
    _run(half, caplog)
    [entry] = _entries(tmp_path / "prepared")
    opened = entries.open_entry(entry, tmp_path / "reader")
    assert opened[0].tensors["pixel_values"].dtype == torch.bfloat16
    opened.close()
    lines = _run(_config(tmp_path, run, "store_fp32"), caplog)
    assert not lines[0].startswith(REUSED)  # another key: prepared again, in float32
    assert len(_entries(tmp_path / "prepared")) == 2
