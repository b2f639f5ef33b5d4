"""Packed vision attention (vieval_runner/vision_attention.py) against transformers' per-image
loop, on the Qwen-VL vision tower alone.

Builds the Qwen2-VL-2B-shaped model of ``anchor_model`` (``--shrink``: the same layout with
tiny dimensions, for a CPU), feeds it ``--images`` images of 448 x 448 (1,024 patches each)
and times ``get_image_features`` both ways, alternately (``--repeats`` each, after a warm-up).
With ``--windowed`` the tower is Qwen2.5-VL's (windowed attention in most layers, a window
per 112 x 112 pixels). Prints images/s of each and whether the outputs are identical; the
LAST line is the speedup of the packed attention over the loop.

    .venv/bin/python scripts/bench_vision.py --shrink                      # CPU
    python3 scripts/bench_vision.py --device cuda --dtype bfloat16 --images 256   # a lent GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vieval_runner.model.vision_attention import pack_vision_attention, unpack_vision_attention  # noqa: E402
from vieval_runner.testing import anchor_model  # noqa: E402


def _tower(args, processor):
    """The vision tower (``model.model``) on the device, Qwen2-VL's or Qwen2.5-VL's."""
    dtype = getattr(torch, args.dtype)
    if not args.windowed:
        return anchor_model.build_anchor_model(processor, args.device, dtype, args.shrink, 0)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    base = anchor_model.anchor_config(processor, args.shrink).to_dict()
    vision = {
        "depth": 2 if args.shrink else 32,
        "hidden_size": 32 if args.shrink else 1280,
        "intermediate_size": 64 if args.shrink else 3420,
        "num_heads": 2 if args.shrink else 16,
        "out_hidden_size": base["text_config"]["hidden_size"],
        "window_size": 112,
        "fullatt_block_indexes": [1] if args.shrink else [7, 15, 23, 31],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }  # fmt: skip  (Qwen2.5-VL-3B's tower layout)
    config = Qwen2_5_VLConfig(text_config=base["text_config"], vision_config=vision)
    torch.manual_seed(0)
    with torch.device(args.device):
        return Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        ).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shrink", action="store_true", help="tiny dimensions (CPU)")
    p.add_argument("--windowed", action="store_true", help="Qwen2.5-VL's windowed tower")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    processor = anchor_model.anchor_processor(2048 if args.shrink else 151936)
    model = _tower(args, processor)
    rng = np.random.default_rng(0)
    px = anchor_model.ANCHOR_IMAGE_PX
    images = [Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8))] * args.images
    inputs = processor.image_processor(images=images, return_tensors="pt")
    pixels = inputs["pixel_values"].to(args.device, getattr(torch, args.dtype))
    grid = inputs["image_grid_thw"].to(args.device)
    cuda = args.device.startswith("cuda")

    def run(packed: bool):
        (pack_vision_attention if packed else unpack_vision_attention)(model)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
        if cuda:
            torch.cuda.synchronize()
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        return time.perf_counter() - t0, torch.cat(list(out)).float().cpu()

    if not pack_vision_attention(model):
        raise SystemExit("the tower was not packed (not SDPA?)")
    _, packed_out = run(True)  # warm-up, both ways
    _, loop_out = run(False)
    same = torch.equal(packed_out, loop_out)
    diff = (packed_out - loop_out).abs().max().item()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for packed in (False, True):  # alternating, so drifting load hits both alike
            times[packed].append(run(packed)[0])
    t_loop, t_packed = statistics.median(times[False]), statistics.median(times[True])
    kind = "Qwen2.5-VL (windowed)" if args.windowed else "Qwen2-VL"
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{kind} tower{' (shrunk)' if args.shrink else ''}, {args.images} images "
          f"{px}x{px}, {args.dtype}, {card}, torch {torch.__version__}, median of {args.repeats}")  # fmt: skip
    print(f"HF per-image loop: {t_loop * 1e3:8.1f} ms  {args.images / t_loop:8.1f} images/s")
    print(f"packed attention:  {t_packed * 1e3:8.1f} ms  {args.images / t_packed:8.1f} images/s")
    print(f"outputs identical: {same} (max abs difference {diff:.3g})")
    print(f"packed / loop speedup: {t_loop / t_packed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
