"""Where one batch's generation time goes, on the Qwen2-VL-2B-shaped model (a diagnosis of where GPU time goes).

One batch of ``--batch`` specimens (448 x 448 images, the anchor's prompt), prepared and
collated by vieval's own code, then timed stage by stage with the device synchronised around
each (after one untimed warm-up of everything):

  vision tower (HF per-image attention loop / packed), rope positions (the model's
  ``_prepare_position_ids_for_generation``), prefill forward (vision included), the whole
  generation of ``--new`` tokens by HF generate, by the lean loop, and by the lean loop with a
  static cache (CUDA-graph decoding steps on CUDA). Decoding time = whole - prefill.

The LAST line is the speedup of the static-cache lean loop over HF generate on this batch.

    python3 scripts/gpu_profile_batch.py --device cuda --dtype bfloat16       # a lent GPU
    .venv/bin/python scripts/gpu_profile_batch.py --shrink --batch 8           # CPU dry run
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vieval_runner.generate import decoding
from vieval_runner.generate.batches import collate  # noqa: E402
from vieval_runner.generate.options import GenerateOptions  # noqa: E402
from vieval_runner.model.vision_attention import pack_vision_attention, unpack_vision_attention  # noqa: E402
from vieval_runner.prepare.inputs import prepare
from vieval_runner.records import (
    LoadedModel,  # noqa: E402
    Specimen,  # noqa: E402
)
from vieval_runner.testing import anchor_model  # noqa: E402


def _specimens(n: int) -> list[Specimen]:
    rng = np.random.default_rng(0)
    px = anchor_model.ANCHOR_IMAGE_PX
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(
            Specimen(f"s{i}", "grounding", "the red car", px, px, image_bytes=buf.getvalue())
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--new", type=int, default=32, help="new tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shrink", action="store_true", help="tiny dimensions (CPU)")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    processor = anchor_model.anchor_processor(2048 if args.shrink else 151936)
    model = anchor_model.build_anchor_model(processor, args.device, dtype, args.shrink, 0)
    device = torch.device(args.device)
    loaded = LoadedModel(model, processor, "qwen2_vl", device, dtype, "anchor")
    pack_vision_attention(model)
    inputs = decoding.to_device(loaded, collate(loaded, prepare(loaded, _specimens(args.batch))))
    cuda = device.type == "cuda"

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    static = GenerateOptions(static_cache=True)
    graphs = decoding.graph_mode(loaded, static)

    def vision():
        model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid)

    def vision_loop():
        unpack_vision_attention(model)
        try:
            vision()
        finally:
            pack_vision_attention(model)

    def positions():
        model._prepare_position_ids_for_generation(inputs["input_ids"], dict(kwargs))

    def prefill():
        model(**inputs, logits_to_keep=1)

    def hf():
        decoding.hf_generate(loaded, inputs, args.new, [], GenerateOptions())

    def lean():
        decoding.lean_greedy(loaded, inputs, args.new, [], False)

    def lean_static():
        decoding.lean_greedy(loaded, inputs, args.new, [], False, True, graphs)

    stages = {"vision tower, HF loop": vision_loop, "vision tower, packed": vision,
              "rope positions": positions, "prefill forward": prefill, "HF generate": hf,
              "lean loop": lean, f"lean, static cache{' + CUDA graphs' if graphs else ''}":
              lean_static}  # fmt: skip
    for fn in stages.values():  # warm-up: kernels, cuBLAS, allocator
        timed(fn)
    seconds = {name: timed(fn) for name, fn in stages.items()}
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"one batch of {args.batch}, {inputs['input_ids'].shape[1]} prompt tokens, "
          f"{args.new} new; {card}, {args.dtype}, torch {torch.__version__}")  # fmt: skip
    pre = seconds["prefill forward"]
    for name, s in seconds.items():
        decode = f"  decoding {s - pre:7.3f} s" if "generate" in name or "lean" in name else ""
        print(f"{name:34s} {s:7.3f} s  {args.batch / s:8.1f} samples/s{decode}")
    last = list(seconds)[-1]
    print(f"{last} over HF generate: {seconds['HF generate'] / seconds[last]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
