"""Shared fixtures: offline mode, tiny training runs built once per session, mixed specimens."""

from __future__ import annotations

import io
import os

# set before anything imports transformers / huggingface_hub: nothing may be downloaded
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

from vieval_runner.records import Specimen  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    """``@pytest.mark.gpu`` tests skip cleanly where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_SIZES = [
    (64, 48),
    (96, 96),
    (120, 80),
    (80, 120),
    (128, 64),
    (50, 70),
    (100, 100),
    (72, 56),
    (110, 90),
]
_PROMPTS = [
    "red circle",
    "the blue square on the left",
    "triangle",
    "what color is the big star at the top right",
    "a",
    "green",
    "the small black circle near the middle of the picture",
    "yellow box",
    "car",
]


def make_specimens(task: str = "grounding") -> list[Specimen]:
    """Nine specimens whose images differ in size and whose prompts differ in length."""
    from PIL import Image, ImageDraw

    specimens = []
    for i, ((w, h), prompt) in enumerate(zip(_SIZES, _PROMPTS, strict=True)):
        image = Image.new("RGB", (w, h), (20 * i, 100, 200 - 10 * i))
        ImageDraw.Draw(image).rectangle(
            [w // 4, h // 4, w // 2, h // 2], fill=(255, 255 - 25 * i, 0)
        )
        buf = io.BytesIO()
        image.save(buf, "PNG")
        specimens.append(Specimen(f"img{i}.png", task, prompt, w, h, image_bytes=buf.getvalue()))
    return specimens


def model_batch(loaded, specimens):
    """A real 3-specimen batch (images of different sizes), padded by the processor; used by
    the weight-swap tests of full checkpoints and of LoRA adapters."""
    from vieval_runner.generate.batches import build_prompt

    chosen = specimens[:3]
    texts = [build_prompt(loaded, s) for s in chosen]
    images = [s.load_image() for s in chosen]
    if loaded.facts.get("nested_images"):
        images = [[image] for image in images]
    inputs = loaded.processor(images=images, text=texts, return_tensors="pt", padding=True)
    inputs.pop("labels", None)
    return inputs


def logits_of(model, inputs):
    """The model's logits on ``inputs``, without gradients."""
    import torch

    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``tiny_run(family)`` -> TinyRun, written once per session per family (steps 100-300)."""
    from transformers.utils import logging as hf_logging

    from vieval_runner.testing.tiny_models import write_tiny_run

    hf_logging.disable_progress_bar()
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = write_tiny_run(tmp_path_factory.mktemp(f"tiny_{family}"), family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory):
    """``tiny_lora_run(family)`` -> TinyRun of LoRA adapter checkpoints, once per session."""
    from transformers.utils import logging as hf_logging

    from vieval_runner.testing.tiny_models import write_tiny_lora_run

    hf_logging.disable_progress_bar()
    cache = {}

    def get(family: str):
        if family not in cache:
            out = tmp_path_factory.mktemp(f"tiny_lora_{family}")
            cache[family] = write_tiny_lora_run(out, family)
        return cache[family]

    return get


@pytest.fixture
def specimens() -> list[Specimen]:
    return make_specimens()


@pytest.fixture(autouse=True, scope="session")
def _private_vieval_cache(tmp_path_factory):
    """No test writes to the user's home cache: reusable prepared inputs go to a session
    tmp folder (``VIEVAL_CACHE_DIR``)."""
    before = os.environ.get("VIEVAL_CACHE_DIR")
    os.environ["VIEVAL_CACHE_DIR"] = str(tmp_path_factory.mktemp("vieval_cache"))
    yield
    if before is None:
        os.environ.pop("VIEVAL_CACHE_DIR", None)
    else:
        os.environ["VIEVAL_CACHE_DIR"] = before


def load_at_200(run, device: str = "cpu", dtype: str = "auto"):
    """A fresh LoadedModel of ``run``'s base with checkpoint-200's weights swapped in."""
    from vieval_runner.model.loading import load_base, swap_weights

    loaded = load_base(run.base_model_dir, device=device, dtype=dtype)
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    return loaded


@pytest.fixture(scope="module")
def loaded_at_200(tiny_run):
    """``loaded_at_200(family)`` -> (LoadedModel at checkpoint-200 on the CPU, run); built
    lazily, once per test module (tests that change its generation config restore it)."""
    cache = {}

    def get(family):
        if family not in cache:
            run = tiny_run(family)
            cache[family] = (load_at_200(run), run)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def shared_vision_run(tiny_run, tmp_path_factory):
    """Steps 100 and 200 share the vision tower: 200 is 100's files with only language-model
    tensors perturbed; 300 differs everywhere (as the tiny run writes it)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from vieval_runner.model import loading as models
    from vieval_runner.model.loading import load_base
    from vieval_runner.testing.tiny_models import TinyRun

    source = tiny_run("qwen2_vl")
    run_dir = tmp_path_factory.mktemp("shared_vision") / "run"
    shutil.copytree(source.run_dir, run_dir)
    keys = models.model_keys(load_base(source.base_model_dir, device="cpu"))
    state = load_file(run_dir / "checkpoint-100" / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    changed = 0
    for key, value in state.items():
        if keys.rename(key) not in keys.vision and value.is_floating_point():
            state[key] = value + 0.05 * torch.randn(value.shape, generator=generator)
            changed += 1
    assert changed and len(keys.vision) > 10
    save_file(state, run_dir / "checkpoint-200" / "model.safetensors", metadata={"format": "pt"})
    return TinyRun(source.base_model_dir, run_dir, source.steps, "qwen2_vl")
