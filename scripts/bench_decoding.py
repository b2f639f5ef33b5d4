"""The lean greedy loop (vieval_runner/decoding.py) against HF ``generate`` on the same batch.

For each decoder-only family's tiny model (or the ones named), one batch of the shapes split
(mixed prompt lengths, so left padding), end tokens suppressed so both run exactly
``--max-new-tokens`` steps; the two are timed alternately (``--repeats`` each, after a warm-up)
and must give the same tokens. Prints per family the median ms of each and HF/lean; the LAST
line is the geometric mean speedup over the families.

With ``--static-cache`` both use a static KV cache: HF ``generate(cache_implementation="static")``
against the lean loop with a static cache, whose decoding steps replay a CUDA graph on CUDA.

    .venv/bin/python scripts/bench_decoding.py                   # CPU, all decoder-only families
    python3 scripts/bench_decoding.py --device cuda qwen2_vl     # a lent GPU
    python3 scripts/bench_decoding.py --device cuda --static-cache   # CUDA graphs vs HF static
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vieval_runner.data import load_specimens  # noqa: E402
from vieval_runner.demo import shapes
from vieval_runner.families import FAMILIES  # noqa: E402
from vieval_runner.generate import decoding  # noqa: E402
from vieval_runner.generate.batches import collate  # noqa: E402
from vieval_runner.generate.options import GenerateOptions  # noqa: E402
from vieval_runner.model.loading import load_base  # noqa: E402
from vieval_runner.model.swap import swap_weights
from vieval_runner.prepare.inputs import prepare
from vieval_runner.testing.tiny_models import FAMILIES_BUILDABLE, write_tiny_run  # noqa: E402


def bench_family(family: str, specimens, args, work: Path) -> tuple[float, float, bool]:
    """Median seconds of HF generate and of the lean loop on one batch; same tokens?"""
    run = write_tiny_run(work / family, family, steps=(100,))
    loaded = load_base(run.base_model_dir, device=args.device)
    swap_weights(loaded, run.run_dir / "checkpoint-100")
    gen = loaded.model.generation_config
    gen.suppress_tokens = sorted(set(decoding.end_ids(loaded)))  # fixed-length work
    prepared = sorted(prepare(loaded, specimens), key=lambda s: -s.prompt_len)
    inputs = decoding.to_device(loaded, collate(loaded, prepared))
    options = GenerateOptions(static_cache=args.static_cache)
    graphs = decoding.graph_mode(loaded, options)

    def hf():
        loaded.model.__dict__.pop("_previous_max_cache_length", None)  # same cache length
        out, _ = decoding.hf_generate(loaded, inputs, args.max_new_tokens, [], options)
        return out[:, inputs["input_ids"].shape[1] :]

    def lean():
        return decoding.lean_greedy(
            loaded, inputs, args.max_new_tokens, [], False, args.static_cache, graphs
        )[0]

    times: dict = {hf: [], lean: []}
    cuda = args.device.startswith("cuda")
    with torch.inference_mode():
        same = torch.equal(hf().cpu(), lean().cpu())  # also the warm-up
        for _ in range(args.repeats):
            for fn in (hf, lean):  # alternating, so drifting load hits both alike
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                times[fn].append(time.perf_counter() - t0)
    return statistics.median(times[hf]), statistics.median(times[lean]), same


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("families", nargs="*", help="default: every decoder-only family")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--static-cache", action="store_true", help="both with a static KV cache")
    args = p.parse_args(argv)
    families = args.families or [
        f for f in FAMILIES_BUILDABLE if not FAMILIES[f]["encoder_decoder"]
    ]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="bench_decoding_"))
    split = shapes.write_split(work / "data", n=args.batch_size, task="grounding", size=64)
    specimens = load_specimens(split, "jsonl", "grounding").specimens
    print(f"device {args.device}, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, median of {args.repeats}"
          + (", static KV cache (lean: CUDA graphs on CUDA)" if args.static_cache else ""))  # fmt: skip
    speedups = []
    for family in families:
        t_hf, t_lean, same = bench_family(family, specimens, args, work)
        speedups.append(t_hf / t_lean)
        print(f"{family:10s} HF generate {t_hf * 1e3:7.1f} ms  lean {t_lean * 1e3:7.1f} ms  "
              f"HF/lean {t_hf / t_lean:.2f}  same tokens: {same}")  # fmt: skip
    geomean = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
    print(
        f"lean speedup over HF generate (geometric mean, {len(speedups)} families): {geomean:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
