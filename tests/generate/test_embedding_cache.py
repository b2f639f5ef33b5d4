"""Vision-embedding cache: reused only while the vision tensors are unchanged (by content),
with the same generated text as without it, and the tower really skipped."""

from __future__ import annotations

import logging

import pytest
import torch

from vieval_runner import store
from vieval_runner.families import FAMILIES
from vieval_runner.generate.batches import generate
from vieval_runner.generate.embedding_cache import VisionCache
from vieval_runner.generate.options import GenerateOptions
from vieval_runner.model.loading import load_base
from vieval_runner.model.swap import swap_weights
from vieval_runner.model.vision_hash import current_vision_hash
from vieval_runner.pipeline import run as runner
from vieval_runner.prepare.inputs import prepare
from vieval_runner.testing.fixtures import quiet_console, run_config
from vieval_runner.testing.tiny_models import FAMILIES_BUILDABLE


def _tower_calls(loaded) -> list:
    calls: list = []
    loaded.model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_cached_embeddings_skip_the_tower_and_change_nothing(shared_vision_run, specimens):
    run = shared_vision_run
    loaded = load_base(run.base_model_dir, device="cpu")
    cache = VisionCache(loaded, current_vision_hash)
    calls = _tower_calls(loaded)
    prepared = prepare(loaded, specimens)
    options = GenerateOptions(vision_cache=cache)
    texts, tower_ran = {}, {}
    for step in (100, 200, 300, 200):
        swap_weights(loaded, run.run_dir / f"checkpoint-{step}")
        cache.refresh()
        before = len(calls)
        out = generate(loaded, prepared, batch_size=4, max_new_tokens=10, options=options)
        texts.setdefault(step, [g.text for g in out])
        tower_ran.setdefault(step, []).append(len(calls) > before)
    assert cache.note is None
    # 100: computed; 200 (same tower): reused; 300: new tower -> computed; 200 again: computed
    assert tower_ran == {100: [True], 200: [False, True], 300: [True]}

    plain = load_base(run.base_model_dir, device="cpu")  # no cache installed
    plain_calls = _tower_calls(plain)
    for step in (100, 200, 300):
        swap_weights(plain, run.run_dir / f"checkpoint-{step}")
        out = generate(plain, prepare(plain, specimens), batch_size=4, max_new_tokens=10)
        assert [g.text for g in out] == texts[step], step
    # three batches per step, the tower every time, plus the lean loop's one-time check of
    # the first batch (decoding.py: two rows through HF generate and the lean loop)
    assert len(plain_calls) == 3 * 3 + 2
    assert texts[100] != texts[200]  # the language model did change: the test can fail


def test_cache_is_emptied_when_the_hash_changes_and_can_be_removed(shared_vision_run, specimens):
    loaded = load_base(shared_vision_run.base_model_dir, device="cpu")
    cache = VisionCache(loaded, current_vision_hash)
    prepared = prepare(loaded, specimens[:4])
    options = GenerateOptions(vision_cache=cache)
    first = cache.refresh()
    generate(loaded, prepared, batch_size=4, max_new_tokens=2, options=options)
    assert len(cache.entries) == 4 and cache.bytes > 0
    swap_weights(loaded, shared_vision_run.run_dir / "checkpoint-300")
    assert cache.refresh() != first and not cache.entries
    cache.close()
    assert "get_image_features" not in vars(loaded.model.model)
    tiny = VisionCache(
        loaded, current_vision_hash, ram_budget_mb=0
    )  # no room: computed every time, still right
    tiny.refresh()
    generate(
        loaded, prepared, batch_size=4, max_new_tokens=2, options=GenerateOptions(vision_cache=tiny)
    )
    assert not tiny.entries and tiny.hits == 0


def test_runner_with_and_without_the_vision_cache_store_the_same(
    tmp_path, shared_vision_run, caplog
):
    stored = {}
    for flag in (True, False):
        config = run_config(tmp_path / str(flag), shared_vision_run, cache_vision=flag)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vieval"):
            outcome = runner.run(config, quiet_console())
        assert outcome.evaluated == [0, 100, 200, 300]
        reader = store.open_store(config.store)
        run_id = config.effective_run_id
        stored[flag] = {
            s: [
                (r["specimen_id"], r["raw_text"], r["f1"])
                for r in reader.step(run_id, s).to_pylist()
            ]
            for s in (0, 100, 200, 300)
        }
        reused = [m for m in caplog.messages if m.startswith("vision embeddings reused")]
        if flag:  # steps 0, 100, 200, 300: only 200 reuses 100's embeddings (6 specimens)
            assert reused == [f"vision embeddings reused for {n} specimens" for n in (0, 0, 6, 0)]
        else:
            assert reused == []
    assert stored[True] == stored[False]


@pytest.mark.parametrize(("family", "reused"), [("qwen2_vl", 6), ("paligemma", 0)])
def test_lora_adapters_reuse_embeddings_only_when_the_tower_is_not_adapted(
    tmp_path, tiny_lora_run, caplog, family, reused
):
    """Qwen2-VL's tower has no q_proj/v_proj (LoRA leaves it alone: reuse the base's
    embeddings); PaliGemma's SigLIP tower has them (adapted: recompute every step)."""
    run = tiny_lora_run(family)
    stored = {}
    for flag in (True, False):
        config = run_config(tmp_path / str(flag), run, cache_vision=flag)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vieval"):
            assert runner.run(config, quiet_console()).evaluated == [0, 100, 200, 300]
        reader = store.open_store(config.store)
        stored[flag] = {
            s: [r["raw_text"] for r in reader.step(config.effective_run_id, s).to_pylist()]
            for s in (0, 100, 200, 300)
        }
        if flag:
            counts = [
                int(m.split()[4])
                for m in caplog.messages
                if m.startswith("vision embeddings reused")
            ]
            assert counts == [0, reused, reused, reused]
    assert stored[True] == stored[False]
    assert len({tuple(v) for v in stored[True].values()}) > 1  # adapters changed the text


def test_embeddings_are_kept_only_for_a_next_checkpoint_with_the_same_tower(
    tmp_path, shared_vision_run, monkeypatch
):
    """Steps 0, 100, 200, 300: only 100's embeddings can serve the next step (200 shares its
    tower, read by the prefetch), so only they are copied to the host and kept."""
    from concurrent.futures import wait

    from vieval_runner.model import prefetch

    kept = []
    real_store = VisionCache._store
    monkeypatch.setattr(
        VisionCache, "_store", lambda self, ids, out: kept.extend(ids) or real_store(self, ids, out)
    )
    # the next checkpoint's read finishes before the step goes on: an unfinished read counts
    # as "may share the tower" and keeps embeddings, which made the count depend on timing
    real_prefetch = prefetch.prefetch_checkpoint

    reads = []

    def read_now(*args, **kwargs):
        reads.append(wait([real_prefetch(*args, **kwargs)]).done.pop())
        return reads[-1]

    monkeypatch.setattr(prefetch, "prefetch_checkpoint", read_now)
    config = run_config(tmp_path, shared_vision_run)
    assert runner.run(config, quiet_console()).evaluated == [0, 100, 200, 300]
    assert len(kept) == 6  # one step's specimens, not four
    assert len(reads) >= 3  # the next checkpoints' reads went through read_now


def test_embeddings_wanted_follows_the_next_checkpoint(tmp_path):
    from concurrent.futures import Future
    from types import SimpleNamespace

    from vieval_runner.model.prefetch import CheckpointTensors
    from vieval_runner.pipeline import overlap

    session = SimpleNamespace(overlap=overlap.State(), open_ended=False)
    st = overlap.state(session)
    st.vision_cache = SimpleNamespace(digest="a")
    assert overlap.embeddings_wanted(session)  # the runner has not said what comes next
    st.following, st.following_known = None, True
    assert not overlap.embeddings_wanted(session)  # the run's last checkpoint
    session.open_ended = True
    assert overlap.embeddings_wanted(session)  # watch: more may come
    nxt = SimpleNamespace(path=tmp_path / "checkpoint-2")
    st.following, st.following_known, read = nxt, True, Future()
    st.prefetch = (nxt.path, read)
    assert overlap.embeddings_wanted(session)  # still being read
    read.set_result(CheckpointTensors(nxt.path, vision_hash="b"))
    assert not overlap.embeddings_wanted(session)
    st.vision_cache.digest = "b"
    assert overlap.embeddings_wanted(session)


DECODER_ONLY = [f for f in FAMILIES_BUILDABLE if not FAMILIES[f]["encoder_decoder"]]


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("family", DECODER_ONLY)
def test_served_batches_leave_their_pixels_on_the_host(tiny_run, specimens, family, lean):
    """A batch whose features all come from the cache never moves (or casts) its pixel
    values: the image-feature call gets them as prepared (the lean loop passes them to the
    forward, HF generate 5.24 encodes images before it), and the texts stay the same. In
    bf16 a use of the float32 host pixels outside the tower would fail or change them."""
    loaded = load_base(tiny_run(family).base_model_dir, device="cpu", dtype="bf16")
    cache = VisionCache(loaded, current_vision_hash)
    if cache.note is not None:
        pytest.skip(cache.note)
    prepared = prepare(loaded, specimens)
    options = GenerateOptions(vision_cache=cache, lean=lean)  # the lean loop or HF generate
    cache.refresh()
    first = [g.text for g in generate(loaded, prepared, 4, 8, options=options)]
    if cache.note is not None:
        pytest.skip(cache.note)
    assert len(cache.entries) == len(specimens)
    pixels: list = []
    real = cache._features

    def spying(*args, **kwargs):
        pixels.append(kwargs.get("pixel_values", args[0] if args else None))
        return real(*args, **kwargs)

    cache._features = spying
    second = [g.text for g in generate(loaded, prepared, 4, 8, options=options)]
    assert second == first and cache.hits == len(specimens)
    assert len(pixels) == 3 and all(p.dtype == torch.float32 for p in pixels)  # 3 batches
