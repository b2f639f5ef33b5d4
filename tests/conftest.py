"""Shared fixtures: offline mode, tiny training runs built once per session, mixed specimens."""

from __future__ import annotations

import os
import subprocess

# set before anything imports transformers / huggingface_hub: nothing may be downloaded
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

from vieval_runner.records import Specimen  # noqa: E402
from vieval_runner.testing.fixtures import load_at_200, make_specimens  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    """``@pytest.mark.gpu`` tests skip cleanly where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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

    from vieval_runner.testing.tiny_lora import write_tiny_lora_run

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

    from vieval_runner.model.keys import model_keys
    from vieval_runner.model.loading import load_base
    from vieval_runner.testing.tiny_run import TinyRun

    source = tiny_run("qwen2_vl")
    run_dir = tmp_path_factory.mktemp("shared_vision") / "run"
    shutil.copytree(source.run_dir, run_dir)
    keys = model_keys(load_base(source.base_model_dir, device="cpu"))
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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on loopback ports for the whole session;
    tests that use it skip, saying why, only where the weed binary cannot run."""
    from vieval_runner.testing.s3_server import S3Server, S3Unavailable

    try:
        server = S3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    except S3Unavailable as exc:
        pytest.skip(f"no S3-compatible server here: {exc}")
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on ``s3_server`` for one test; returns its name."""
    import re
    import uuid

    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:30].strip("-")
    return s3_server.create_bucket(f"{stem}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 4 MiB tmpfs to fill up (needs root and mount); skipped where it cannot be made."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
