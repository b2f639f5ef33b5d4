"""Throughput of evaluating every checkpoint: a user's per-sample loop vs batched HF vs `vieval run`.

In ONE process, on one fixture run (``--checkpoints`` checkpoints) and one split
(``--specimens`` shapes images), with the same ``max_new_tokens`` and greedy decoding, times

  (a) the per-sample loop a user writes: per checkpoint ``from_pretrained`` + ``AutoProcessor``,
      then per image: open it, run the processor, one ``generate``, decode;
  (b) plain batched HF generate: per checkpoint ``from_pretrained`` + ``AutoProcessor``, per
      batch of ``--batch-size``: open the images, processor with left padding, ``generate``;
  (c) `vieval run`, in process (``runner.run(load_config(...))``: no interpreter start or import
      cost counted against it), end to end: data, store, base load, preprocessing, checkpoint
      hashing, weight swaps, generation, parsing, scoring and one commit per step. A COLD run:
      its ``prepared_cache_dir`` is a fresh, emptied folder in the work dir, so nothing prepared
      by an earlier run is reused (saving the inputs for reuse, the default, is counted).
  (c2) (not part of the ratios) `vieval run` again on a new store, as a user re-evaluating on
      demand: the prepared inputs (c) saved are reused.
  (c3) (``--static-cache``; not part of the ratios) (c) again, cold, with ``static_cache: true``:
      a static KV cache, and on CUDA decoding steps replayed from CUDA graphs.

An untimed warm-up first runs HF generate and a 2-specimen `vieval run` of its own, so neither
(a) nor (c) pays process-wide first-use costs (CUDA context, lazy imports, the Delta Lake
runtime); it leaves nothing (c) reuses.

End tokens are suppressed in the fixture's generation configs, so every generation runs exactly
``max_new_tokens`` steps and the three methods do the same work (random weights would otherwise
stop at random steps, and a batch runs until its last row stops).
samples = specimens x checkpoints. Texts of (b) and (c) are checked against (a) (a WARNING line
if any differ). The LAST line is the ratios, e.g. ``c/a=7.3 c/b=1.4``.

    .venv/bin/python scripts/bench_throughput.py                       # tiny preset, CPU
    python3 scripts/bench_throughput.py --preset qwen2vl-2b --specimens 512 --checkpoints 3 \\
        --batch-size 256 --max-new-tokens 32 --per-sample-limit 16 --device cuda \\
        --dtype bfloat16 --json out.json                                # GPU (scripts/gpu_check.sh)
    ... --preset qwen2vl-2b --shrink --device cpu                      # CPU dry run, tiny dims
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout too

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
from vieval_runner.families import FAMILIES  # noqa: E402

TEMPLATE = FAMILIES["qwen2_vl"]["templates"]["grounding"]  # what `vieval run` prompts with


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "qwen2vl-2b"), default="tiny")
    p.add_argument("--shrink", action="store_true", help="qwen2vl-2b with tiny dims (CPU dry run)")
    p.add_argument("--specimens", type=int, default=64)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--per-sample-limit", type=int, default=None, metavar="N",
                   help="time (a) on the first N specimens per checkpoint and extrapolate")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", *_DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="work folder (default: a temp folder, removed)")
    p.add_argument(
        "--static-cache",
        action="store_true",
        help="also time (c3): (c) with static_cache: true (CUDA graphs on CUDA)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON")
    args = p.parse_args(argv)
    if args.shrink and args.preset != "qwen2vl-2b":
        p.error("--shrink only applies to --preset qwen2vl-2b")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    for name in ("specimens", "checkpoints", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def say(text: str) -> None:
    print(text, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ fixture


def build_fixture(args: argparse.Namespace, work: Path) -> dict:
    """Write the run (base + checkpoints) and the shapes split; return their paths."""
    from vieval_runner.demo import shapes

    t0 = time.perf_counter()
    steps = tuple(100 * (i + 1) for i in range(args.checkpoints))
    info: dict = {}
    if args.preset == "tiny":
        from vieval_runner.testing.tiny_models import write_tiny_run

        run = write_tiny_run(work / "fixture", "qwen2_vl", steps=steps)
        fixed_length([run.base_model_dir] + [run.run_dir / f"checkpoint-{s}" for s in steps])
        image_px = 64
    else:
        from vieval_runner.testing.anchor_model import ANCHOR_IMAGE_PX, write_anchor_run

        run = write_anchor_run(
            work / "fixture",
            checkpoints=args.checkpoints,
            device=args.device,
            dtype=_DTYPES[args.dtype],
            shrink=args.shrink,
        )
        image_px = ANCHOR_IMAGE_PX
        info.update(n_parameters=run.n_parameters, checkpoint_bytes=run.checkpoint_bytes,
                    model_build_s=run.build_s, model_save_s=run.save_s)  # fmt: skip
    split = shapes.write_split(work / "data", n=args.specimens, task="grounding", size=image_px)
    info.update(
        base=str(run.base_model_dir),
        run_dir=str(run.run_dir),
        checkpoints=[str(run.run_dir / f"checkpoint-{s}") for s in run.steps],
        steps=list(run.steps),
        split=str(split),
        image_px=image_px,
        fixture_s=time.perf_counter() - t0,
    )
    return info


def fixed_length(folders: list[Path]) -> None:
    """Suppress end tokens in the saved generation configs: random weights end at random
    steps, and a batch runs until its last row ends, so the methods would do different
    amounts of work. With this every generation runs exactly ``max_new_tokens`` steps (the
    anchor model is saved that way already)."""
    from transformers import GenerationConfig

    for folder in folders:
        gen = GenerationConfig.from_pretrained(folder)
        eos = gen.eos_token_id
        ends = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        gen.suppress_tokens = sorted({int(i) for i in [*ends, gen.pad_token_id] if i is not None})
        gen.save_pretrained(folder)


def load_split(split: str):
    from vieval_runner.data import load_specimens

    return load_specimens(split, "jsonl", "grounding").specimens


# ------------------------------------------------------------------------------ (a) and (b)


def load_hf(path: str, args: argparse.Namespace):
    """What a user writes: the checkpoint's model (SDPA, eval) and processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=_DTYPES[args.dtype], attn_implementation="sdpa", device_map=args.device
    ).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


def prompt_text(processor, specimen) -> str:
    content = [
        {"type": "image"},
        {"type": "text", "text": TEMPLATE.replace("{prompt}", specimen.prompt)},
    ]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def end_ids(model, processor) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    ids |= {processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id}
    return {int(i) for i in ids if i is not None}


def generate_texts(model, processor, specimens, args) -> tuple[list[str], list[int]]:
    """One processor call and one generate for ``specimens``; decoded new tokens, counts."""
    images = [s.load_image() for s in specimens]
    texts = [prompt_text(processor, s) for s in specimens]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    inputs = inputs.to(args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(_DTYPES[args.dtype])
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             num_beams=1)  # fmt: skip
    ends = end_ids(model, processor)
    decoded, counts = [], []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        stop = next((i for i, t in enumerate(row) if t in ends), len(row))
        decoded.append(processor.tokenizer.decode(row[:stop], skip_special_tokens=False,
                                                  clean_up_tokenization_spaces=False))  # fmt: skip
        counts.append(stop)
    return decoded, counts


def method_hf(fixture: dict, specimens, args, batch: int, limit: int | None) -> dict:
    """(a) with ``batch=1`` (over the first ``limit`` specimens), (b) with the batch size."""
    todo = specimens[:limit] if limit else specimens
    load_s, gen_s, texts, counts = [], [], {}, []
    reset_peak(args.device)
    for step, path in zip(fixture["steps"], fixture["checkpoints"], strict=True):
        t0 = time.perf_counter()
        model, processor = load_hf(path, args)
        sync(args.device)
        load_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            decoded, n = generate_texts(model, processor, chunk, args)
            texts.update({(step, s.specimen_id): t for s, t in zip(chunk, decoded, strict=True)})
            counts.extend(n)
        sync(args.device)
        gen_s.append(time.perf_counter() - t0)
        say(f"    step {step}: load {load_s[-1]:.2f}s, {len(todo)} samples {gen_s[-1]:.2f}s")
        del model, processor
        free(args.device)
    measured = sum(load_s) + sum(gen_s)
    # extrapolate the generation part to the whole split; loads are per checkpoint either way
    full = sum(load_s) + sum(gen_s) * len(specimens) / len(todo)
    return {
        "samples": len(specimens) * len(fixture["steps"]),
        "samples_timed": len(todo) * len(fixture["steps"]),
        "seconds_measured": measured,
        "seconds": full,
        "extrapolated": len(todo) < len(specimens),
        "load_s": load_s,
        "generate_s": gen_s,
        "all_full_length": all(n == args.max_new_tokens for n in counts),
        "peak_gpu_gib": peak_gib(args.device),
        "samples_per_s": len(specimens) * len(fixture["steps"]) / full,
        "_texts": texts,
    }


# ------------------------------------------------------------------------------ (c)


class _StepLog(logging.Handler):
    """Collects the runner's ``step N committed: {timings}`` and ``prepared ...`` log records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.steps: list[dict] = []
        self.prepare_s: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("step ") and " committed: " in message:
            with contextlib.suppress(ValueError):  # a changed log format: fall back to the table
                self.steps.append(json.loads(message.split(" committed: ", 1)[1]))
        elif found := re.match(r"prepared \d+ specimens in ([\d.]+)s", message):
            self.prepare_s = float(found.group(1))


def method_vieval(
    fixture: dict, args, work: Path, cold: bool = True, settings: dict | None = None
) -> dict:
    """(c) `vieval run` in process on a config naming the same run, split and settings.
    ``cold=False``: a second run on a new store that reuses the prepared inputs (c2).
    ``settings``: config keys to set on top (c3)."""
    import yaml

    from vieval_runner import checkpoints as ckpts
    from vieval_runner import store
    from vieval_runner.config import load_config
    from vieval_runner.pipeline import run as runner

    name = "store" if cold else "store-again"
    if settings:
        name += "-" + "-".join(sorted(settings))
    store_dir, prepared_dir = work / name, work / "prepared-cache"
    shutil.rmtree(store_dir, ignore_errors=True)
    if cold:
        shutil.rmtree(prepared_dir, ignore_errors=True)  # no inputs reused from a past run
    config = {**vieval_config(fixture, args, store_dir, prepared_dir), **(settings or {})}
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    reset_peak(args.device)
    logger, handler = logging.getLogger("vieval"), _StepLog()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    t0 = time.perf_counter()
    try:
        outcome = runner.run(load_config(path), Console(quiet=True))
        sync(args.device)
    finally:
        total = time.perf_counter() - t0
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    peak = peak_gib(args.device)
    free(args.device)
    if outcome.failed:
        raise SystemExit(f"vieval run failed on steps {outcome.failed}")
    reader = store.open_store(str(store_dir))
    texts = {}
    for step in fixture["steps"]:
        table = reader.step("bench", step)
        for sid, raw in zip(table.column("specimen_id").to_pylist(),
                            table.column("raw_text").to_pylist(), strict=True):  # fmt: skip
            texts[(step, sid)] = raw
    per_step: dict[str, float] = {}
    # the runner logs each step's timings (commit included); the table's copy lacks the commit
    logged = handler.steps or [
        json.loads(raw) if isinstance(raw, str) else raw or {}
        for raw in reader.evaluations("bench").column("timings").to_pylist()
    ]
    for timings in logged:
        for key, value in timings.items():
            per_step[key] = per_step.get(key, 0.0) + float(value)
    if handler.prepare_s is not None:
        per_step["prepare_s"] = handler.prepare_s
    t0 = time.perf_counter()  # the runner hashes every checkpoint: re-time one, scale
    ckpts.checkpoint_hash(fixture["checkpoints"][0])
    per_step["hash_s (re-timed)"] = (time.perf_counter() - t0) * len(fixture["checkpoints"])
    in_steps = sum(v for k, v in per_step.items() if not k.startswith("hash"))
    per_step["other_s (data, specimens table, base load, hash, training log)"] = total - in_steps
    samples = len(texts)
    return {"samples": samples, "seconds": total, "samples_per_s": samples / total,
            "breakdown_s": per_step, "per_step_s": handler.steps, "in_process": True, "peak_gpu_gib": peak, "_texts": texts}  # fmt: skip


# ------------------------------------------------------------------------------ main


def compare(reference: dict, other: dict) -> list[str]:
    return [f"step {k[0]} {k[1]}" for k, text in reference.items() if other.get(k) != text]


def warm_up(fixture: dict, specimens, args, work: Path) -> float:
    """Untimed: first CUDA context / kernels / lazy imports, so (a) does not pay for them,
    and the same for (c): one `vieval run` of the first checkpoint on a 2-specimen split of
    its own, into its own store and prepared-input folder (nothing it leaves is reused: the
    timed (c) has another split, store and folder; the model is loaded again)."""
    from vieval_runner.config import config_from_dict
    from vieval_runner.demo import shapes
    from vieval_runner.pipeline import run as runner

    t0 = time.perf_counter()
    model, processor = load_hf(fixture["base"], args)
    generate_texts(model, processor, specimens[:1], args)
    generate_texts(model, processor, specimens[: args.batch_size], args)
    del model, processor
    free(args.device)
    size = fixture["image_px"]
    split = shapes.write_split(work / "warm-up-data", n=2, task="grounding", seed=1, size=size)
    config = vieval_config(fixture, args, work / "warm-up-store", work / "warm-up-prepared")
    config.update(data={"path": str(split), "format": "jsonl"}, steps=fixture["steps"][:1])
    outcome = runner.run(config_from_dict(config), Console(quiet=True))
    if outcome.failed:
        raise SystemExit(f"warm-up vieval run failed: {outcome.failed}")
    free(args.device)
    return time.perf_counter() - t0


def vieval_config(fixture: dict, args, store_dir: Path, prepared_dir: Path) -> dict:
    """The `vieval run` config (c) uses: the fixture's run and split, the bench's settings."""
    return {
        "run_dir": fixture["run_dir"], "base_model": fixture["base"], "store": str(store_dir),
        "run_id": "bench", "task": "grounding", "data": {"path": fixture["split"], "format": "jsonl"},
        "steps": fixture["steps"], "include_base": False, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "device": args.device, "dtype": args.dtype,
        "prepared_cache_dir": str(prepared_dir),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    import transformers

    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    say(f"device {args.device} ({card or 'cpu'}), dtype {args.dtype}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {os.cpu_count()} CPUs")  # fmt: skip
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "preset": args.preset, "shrink": args.shrink, "device": args.device, "card": card,
        "dtype": args.dtype, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "complete": False,
    }  # fmt: skip

    def save() -> None:  # after every stage, so a time-boxed run still leaves its figures
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            public = {k: _public(v) for k, v in result.items()}
            Path(args.json).write_text(json.dumps(public, indent=2) + "\n")

    try:
        fixture = build_fixture(args, work)
        specimens = load_split(fixture["split"])
        n, c = len(specimens), len(fixture["steps"])
        limit = min(args.per_sample_limit or n, n)
        result.update(specimens=n, checkpoints=c, per_sample_limit=limit,
                      fixture={k: v for k, v in fixture.items() if k != "checkpoints"})  # fmt: skip
        save()
        say(f"fixture {args.preset}{' (shrunk)' if args.shrink else ''}: {c} checkpoints, "
            f"{n} specimens, built in {fixture['fixture_s']:.1f}s in {work}")  # fmt: skip
        result["warmup_s"] = warm_up(fixture, specimens, args, work)
        say(f"warm-up (untimed) {result['warmup_s']:.1f}s")
        say(f"(a) per-sample loop ({limit} of {n} specimens per checkpoint)")
        a = result["a_per_sample"] = method_hf(fixture, specimens, args, 1, limit)
        save()
        say(f"(b) batched HF generate, batch {args.batch_size}")
        b = result["b_batched_hf"] = method_hf(fixture, specimens, args, args.batch_size, None)
        save()
        say("(c) vieval run (in process)")
        cc = result["c_vieval_run"] = method_vieval(fixture, args, work)
        bad_b, bad_c = compare(a["_texts"], b["_texts"]), compare(a["_texts"], cc["_texts"])
        result.update(texts_checked=len(a["_texts"]), b_mismatches=len(bad_b),
                      c_mismatches=len(bad_c), c_over_a=cc["samples_per_s"] / a["samples_per_s"],
                      c_over_b=cc["samples_per_s"] / b["samples_per_s"], complete=True)  # fmt: skip
        save()
        say("(c2) vieval run again on a new store: prepared inputs reused")  # after the ratios
        c2 = result["c2_vieval_rerun"] = method_vieval(fixture, args, work, cold=False)
        result["c2_over_b"] = c2["samples_per_s"] / b["samples_per_s"]
        save()
        if compare(cc["_texts"], c2["_texts"]):
            say("WARNING: (c2) differs from (c)")
        c3 = None
        if args.static_cache:
            say("(c3) vieval run, cold, static_cache: true")
            c3 = result["c3_vieval_static"] = method_vieval(
                fixture, args, work, settings={"static_cache": True}
            )
            result["c3_over_b"] = c3["samples_per_s"] / b["samples_per_s"]
            result["c3_mismatches"] = len(compare(cc["_texts"], c3["_texts"]))
            save()
        if not (a["all_full_length"] and b["all_full_length"]):
            say(f"WARNING: some generations stopped before {args.max_new_tokens} tokens")
        for name, bad in (("b", bad_b), ("c", bad_c)):
            if bad:
                say(f"WARNING: ({name}) differs from (a) on {len(bad)} of {len(a['_texts'])} "
                    f"samples (first: {bad[:3]})")  # fmt: skip
        ext = " (extrapolated)" if a["extrapolated"] else ""
        say(f"(a) per-sample loop : {a['samples_per_s']:8.2f} samples/s{ext}")
        say(f"(b) batched HF      : {b['samples_per_s']:8.2f} samples/s")
        say(f"(c) vieval run      : {cc['samples_per_s']:8.2f} samples/s  breakdown: "
            + ", ".join(f"{k} {v:.2f}" for k, v in cc["breakdown_s"].items()))  # fmt: skip
        say(f"(c2) vieval re-run  : {c2['samples_per_s']:8.2f} samples/s  "
            f"(prepare_s {c2['breakdown_s'].get('prepare_s', 0):.3f}) c2/b={result['c2_over_b']:.2f}")  # fmt: skip
        if c3 is not None:
            say(f"(c3) static cache   : {c3['samples_per_s']:8.2f} samples/s  breakdown: "
                + ", ".join(f"{k} {v:.2f}" for k, v in c3["breakdown_s"].items())
                + f"; c3/b={result['c3_over_b']:.2f}, texts differing from (c): "
                f"{result['c3_mismatches']}")  # fmt: skip
        say(f"c/a={result['c_over_a']:.1f} c/b={result['c_over_b']:.2f}")
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _public(value):
    """Figures without the per-sample texts (kept in memory for the comparison only)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if not k.startswith("_")}
    return value


if __name__ == "__main__":
    sys.exit(main())
