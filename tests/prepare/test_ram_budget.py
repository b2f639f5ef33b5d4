"""Prepared processor outputs under a RAM budget: the disk-backed set generates exactly what
the in-memory list does, the budget holds, worker threads change nothing, files go away."""

from __future__ import annotations

import pytest
import torch

from vieval_runner.generate.batches import generate
from vieval_runner.model.loading import load_base
from vieval_runner.model.swap import swap_weights
from vieval_runner.prepare.inputs import prepare
from vieval_runner.prepare.ram_budget import PreparedSet, nbytes


@pytest.fixture(scope="module")
def qwen(tiny_run):
    run = tiny_run("qwen2_vl")
    loaded = load_base(run.base_model_dir, device="cpu")
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    return loaded


def _same(a, b) -> None:
    assert a.specimen_id == b.specimen_id and a.input_size == b.input_size
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def test_disk_backed_set_generates_the_same_as_the_ram_list(qwen, specimens, tmp_path):
    in_ram = prepare(qwen, specimens)
    assert isinstance(in_ram, list)
    on_disk = prepare(qwen, specimens, ram_budget_mb=0, cache_dir=tmp_path)
    assert isinstance(on_disk, PreparedSet)
    assert on_disk.on_disk == len(specimens) and on_disk.ram_bytes == 0
    chunks = list(tmp_path.glob("vieval-prepared-*/chunk-*.safetensors"))
    assert chunks and on_disk.disk_bytes == sum(nbytes(p) for p in in_ram)
    for a, b in zip(in_ram, on_disk, strict=True):
        _same(a, b)
    assert on_disk.prompt_lens == [p.prompt_len for p in in_ram]
    want = generate(qwen, in_ram, batch_size=4, max_new_tokens=8)
    got = generate(qwen, on_disk, batch_size=4, max_new_tokens=8)
    assert [g.text for g in got] == [g.text for g in want]
    assert [g.input_size for g in got] == [g.input_size for g in want]
    on_disk.close()
    assert not list(tmp_path.glob("vieval-prepared-*"))


def test_ram_budget_is_respected(qwen, specimens, tmp_path):
    sizes = [nbytes(p) for p in prepare(qwen, specimens)]
    budget = sum(sizes[:3]) + 1  # the first three fit, the fourth does not
    chunk = max(sizes)  # every chunk file holds about one specimen
    prepared = PreparedSet(budget, cache_dir=tmp_path, chunk_bytes=chunk)
    for p in prepare(qwen, specimens):
        prepared.append(p)
    prepared.finish()
    assert prepared.ram_bytes == sum(sizes[:3]) <= budget
    assert prepared.peak_ram_bytes <= budget + chunk  # at most one pending chunk
    assert prepared.on_disk == len(specimens) - 3
    assert 2 <= len(list(tmp_path.glob("vieval-prepared-*/chunk-*"))) <= prepared.on_disk
    for a, b in zip(prepare(qwen, specimens), prepared, strict=True):
        _same(a, b)  # read back from RAM and from every chunk
    # through prepare(): the same split into RAM and disk
    via = prepare(qwen, specimens, ram_budget_mb=budget / 2**20, cache_dir=tmp_path)
    assert via.ram_bytes <= budget and via.on_disk == len(specimens) - 3


def test_worker_threads_give_the_same_outputs_in_order(qwen, specimens):
    one = prepare(qwen, specimens)
    many = prepare(qwen, specimens * 3, workers=2)
    assert len(many) == 3 * len(specimens)
    for a, b in zip(one * 3, many, strict=True):
        _same(a, b)


def test_a_split_the_disk_cannot_hold_is_a_clear_error_before_writing(
    qwen, specimens, tmp_path, monkeypatch
):
    """At the first specimen beyond the RAM budget the rest of the split (estimated at that
    specimen's size) must fit the free disk space; if not, a DataError naming the folder, the
    sizes and the settings to change, with nothing written."""
    import collections

    from vieval_runner.data import DataError
    from vieval_runner.prepare import ram_budget as prepared_cache

    items = prepare(qwen, specimens)
    sizes = [nbytes(p) for p in items]
    usage = collections.namedtuple("usage", "total used free")
    free = sum(sizes[3:]) // 2  # half of what the six spilled specimens need
    monkeypatch.setattr(prepared_cache.shutil, "disk_usage", lambda p: usage(10**12, 0, free))
    prepared = PreparedSet(sum(sizes[:3]) + 1, tmp_path / "cache", expected_count=len(items))
    for p in items[:3]:
        prepared.append(p)  # in RAM: no check yet
    with pytest.raises(DataError, match="prepared split needs about .* GB on disk") as caught:
        prepared.append(items[3])
    message = str(caught.value)
    assert str(tmp_path / "cache") in message
    assert "cache_dir" in message and "prepare_cache_ram_mb" in message
    assert not list((tmp_path / "cache").glob("vieval-prepared-*"))  # nothing written
    # with room for them all, the same split spills as usual
    monkeypatch.setattr(prepared_cache.shutil, "disk_usage", lambda p: usage(10**12, 0, sum(sizes)))
    roomy = prepare(qwen, specimens, ram_budget_mb=sum(sizes[:3]) / 2**20, cache_dir=tmp_path)
    assert roomy.on_disk == len(specimens) - 3
