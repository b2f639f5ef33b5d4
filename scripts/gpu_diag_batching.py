"""Batch invariance diagnosis: for each family, one specimen alone vs inside a batch of 8
(fp32, cuDNN TF32 on and off): do the texts differ, and by how much do the last-token logits?
Found SmolVLM's CUDA batching bug (docs/benchmarks.md). Run from the repo root:

    DEV=cuda python3 scripts/gpu_diag_batching.py smolvlm qwen2_vl
"""

import os
import sys
import tempfile
import time

import torch

from vieval_runner.families import FAMILIES
from vieval_runner.generate.batches import collate, generate
from vieval_runner.model.loading import load_base
from vieval_runner.model.swap import swap_weights
from vieval_runner.prepare.inputs import prepare
from vieval_runner.testing.tiny_models import write_tiny_run

sys.path.insert(0, "tests")
from conftest import make_specimens  # noqa: E402  (the tests' mixed-size specimens)

DEV = os.environ.get("DEV", "cuda")


def _to(inputs):
    return {k: v.to(DEV) for k, v in inputs.items()}


# measure the real batched path, not generate()'s one-at-a-time guard for such families
for facts in FAMILIES.values():
    facts["batches_on_cuda"] = True
t0 = time.time()
specimens = make_specimens()
for family in sys.argv[1:] or ("smolvlm", "qwen2_vl"):
    run = write_tiny_run(tempfile.mkdtemp(), family)
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        loaded = load_base(run.base_model_dir, device=DEV, dtype="fp32")
        swap_weights(loaded, run.run_dir / "checkpoint-200")
        prepared = prepare(loaded, specimens)
        one = [g.text for g in generate(loaded, prepared, batch_size=1, max_new_tokens=10)]
        many = [g.text for g in generate(loaded, prepared, batch_size=8, max_new_tokens=10)]
        diff = [i for i in range(len(one)) if one[i] != many[i]]
        # logits of the first forward: specimen alone vs inside a batch of 8
        with torch.inference_mode():
            order = sorted(range(len(prepared)), key=lambda i: -prepared[i].prompt_len)[:8]
            batch = collate(loaded, [prepared[i] for i in order])
            single = collate(loaded, [prepared[order[-1]]])
            lb = loaded.model(**_to(batch)).logits[-1, -1]
            ls = loaded.model(**_to(single)).logits[0, -1]
            gap = (lb - ls).abs().max().item()
            top2 = ls.topk(2).values
        print(
            f"{family:9s} cudnn_tf32={tf32!s:5s} text differs at {diff} | last-logit max diff {gap:.2e} "
            f"| top1-top2 margin {float(top2[0] - top2[1]):.2e} | {time.time() - t0:.0f}s",
            flush=True,
        )
        del loaded
        torch.cuda.empty_cache()
