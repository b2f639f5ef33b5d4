"""Helpers the tests share: specimens of mixed sizes and prompt lengths, a real padded batch,
logits without gradients, and a tiny model with checkpoint-200 swapped in. Test-only: the
product never imports ``vieval_runner.testing``."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from vieval_runner.config import config_from_dict
from vieval_runner.records import Specimen

SIZES = [
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
PROMPTS = [
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
    for i, ((w, h), prompt) in enumerate(zip(SIZES, PROMPTS, strict=True)):
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
    from vieval_runner.prepare.inputs import build_prompt

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


def load_at_200(run, device: str = "cpu", dtype: str = "auto"):
    """A fresh LoadedModel of ``run``'s base with checkpoint-200's weights swapped in."""
    from vieval_runner.model.loading import load_base
    from vieval_runner.model.swap import swap_weights

    loaded = load_base(run.base_model_dir, device=device, dtype=dtype)
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    return loaded


def target_box(w: int, h: int) -> tuple[float, float, float, float]:
    return (0.1 * w, 0.2 * h, 0.6 * w, 0.75 * h)


def write_split(folder: Path, task: str, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in make_specimens(task)[:n]:
        (folder / spec.specimen_id).write_bytes(spec.image_bytes)
        row = {
            "id": spec.specimen_id,
            "image": spec.specimen_id,
            "task": task,
            "prompt": spec.prompt,
        }
        if task == "grounding":
            row["boxes"] = [
                {"label": spec.prompt, "box": list(target_box(spec.width, spec.height))}
            ]
        else:
            row["answers"] = ["red", "a red one"]
        rows.append(row)
    path = folder / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(tmp_path: Path, run, task: str = "grounding", **extra):
    data = write_split(tmp_path / "data", task)
    tree = {
        "run_dir": str(run.run_dir),
        "base_model": str(run.base_model_dir),
        "store": str(tmp_path / "store"),
        "task": task,
        "data": {"path": str(data)},
        "batch_size": 4,
        "max_new_tokens": 12,
        "device": "cpu",
        **extra,
    }
    return config_from_dict(tree)


def quiet_console() -> Console:
    return Console(quiet=True)


def decoder_only_families() -> list[str]:
    """The buildable tiny families that decode with a decoder only (not Florence-2)."""
    from vieval_runner.families import FAMILIES
    from vieval_runner.testing.tiny_models import FAMILIES_BUILDABLE

    return [f for f in FAMILIES_BUILDABLE if not FAMILIES[f]["encoder_decoder"]]


def padded_batch(loaded, specimens):
    """The nine mixed-size specimens as one left-padded batch (longest prompt first)."""
    from vieval_runner.generate import decoding
    from vieval_runner.generate.batches import collate
    from vieval_runner.prepare.inputs import prepare

    prepared = sorted(prepare(loaded, specimens), key=lambda p: -p.prompt_len)
    assert prepared[0].prompt_len > prepared[-1].prompt_len  # real padding in the batch
    return decoding.to_device(loaded, collate(loaded, prepared))


def fill_disk(disk: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``disk`` (a folder) until the OS says ENOSPC, then free
    ``leave`` bytes; returns the filler file (delete it to free the space)."""
    import os

    filler = Path(disk) / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush on close
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


# The libraries whose internals exact comparisons depend on; their versions in the tested set
# (requirements.lock, beside the package in a checkout) are what the assertions were written
# for. Outside a checkout: the set of the last lock.
INTERNALS = {"transformers": "5.25.0", "peft": "0.21.2", "torch": "2.14.1"}
_LOCK = Path(__file__).resolve().parents[2] / "requirements.lock"


def _written_for() -> dict[str, str]:
    found = dict(INTERNALS)
    if _LOCK.is_file():
        for line in _LOCK.read_text().splitlines():
            name, _, version = line.partition(";")[0].strip().partition("==")
            if name in found:
                found[name] = version
    return found


def versions_note() -> str:
    """``written for transformers 5.25.0, peft 0.21.2, torch 2.14.1; now: ...`` for assertions
    whose exact values depend on another library's internals, so drift says what moved."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name).split("+")[0]
        except PackageNotFoundError:
            return "absent"

    written = _written_for()
    now = {name: installed(name) for name in written}
    moved = [name for name in written if now[name] != written[name]]
    note = "written for " + ", ".join(f"{k} {v}" for k, v in written.items())
    note += "; now: " + ", ".join(f"{k} {v}" for k, v in now.items())
    return note + (f" (moved: {', '.join(moved)})" if moved else "")
