"""Which checkpoints still need evaluating: resume by checkpoint content and config.

A (run, step) is done when an ``ok`` evaluation is stored for the same checkpoint content
hash and the same prediction-relevant config (``config_hash``). Hashing reads every byte of
the weights, so a step with nothing stored to compare against is hashed on a background
thread (a ``Future``) while it is evaluated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

from vieval_runner import checkpoints as ckpts
from vieval_runner import store
from vieval_runner.config import Config, dump_config

log = logging.getLogger("vieval")

_HASHER = ThreadPoolExecutor(1, thread_name_prefix="vieval-hash")


def config_hash(config: Config) -> str:
    """Hash of the settings that change predictions (not paths to the store or the selection)."""
    relevant = dump_config(config)
    for key in (
        "store",
        "storage_options",
        "checkpoint_cache_dir",
        "checkpoint_cache_gb",
        "steps",
        "every",
        "step_range",
        "include_base",
        "force",
        "watch",
        "lora",  # checks only: a checkpoint that runs predicts the same
        "run_id",
        # throughput knobs: predictions are the same with any of them
        "preprocess_workers",
        "prepare_cache_ram_mb",
        "cache_dir",
        "prefetch",
        "overlap",
        "cache_vision",
        "vision_cache_ram_mb",
        "static_cache",
        "compile",
    ):
        relevant.pop(key, None)
    # which images the limit lets in shows in the dataset version, not in each prediction
    relevant.get("data", {}).pop("max_image_pixels", None)
    # intervals only; stores written before the setting existed keep their hashes
    relevant.get("scoring", {}).pop("ap_bootstrap_resamples", None)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def already_done(config: Config, checkpoint_hash: str, step: int, done: list[dict]) -> bool:
    """True when this (run, step) was stored ok for the same checkpoint content and config."""
    run_id, wanted = config.effective_run_id, config_hash(config)
    for row in done:
        if (
            row.get("run_id") == run_id
            and row.get("step") == step
            and row.get("status") == "ok"
            and row.get("checkpoint_hash") == checkpoint_hash
            and row.get("config_hash") == wanted
        ):
            return True
    return False


def plan_checkpoints(
    config: Config,
    checkpoints: list[ckpts.Checkpoint],
    console: Console,
    outcome,
    *,
    explicit: bool = False,
    lazy: bool = False,
) -> list[tuple[ckpts.Checkpoint, str | Future]]:
    """``(checkpoint, content hash)`` of each complete checkpoint still to evaluate; steps
    already stored for the same content and config go to ``outcome.skipped``.

    ``lazy``: a step with no stored evaluation to compare against needs its hash only for
    the record, so it is hashed on a background thread (a ``Future``, resolved when the
    evaluation row is built) instead of before generation: ~1 s per 4 GB checkpoint saved.
    """
    done = (
        []
        if (config.force or explicit)
        else store.stored_evaluations(config.store, storage_options=config.storage_options or None)
    )
    run_id, wanted = config.effective_run_id, config_hash(config)
    if done:  # a step holding an unfinished commit's orphans is evaluated again: that cleans it
        orphaned = store.orphaned_steps(
            config.store, run_id, storage_options=config.storage_options or None
        )
        done = [r for r in done if not (r.get("run_id") == run_id and r.get("step") in orphaned)]
        if orphaned:
            console.print(
                f"[dim]steps {sorted(orphaned)} hold predictions of an unfinished commit "
                "(ignored by readers): evaluating them again replaces them[/]"
            )
    comparable = {
        r.get("step")
        for r in done
        if r.get("run_id") == run_id and r.get("status") == "ok" and r.get("config_hash") == wanted
    }
    todo = []
    for ckpt in checkpoints:
        if not ckpt.complete:
            console.print(f"[dim]step {ckpt.step}: not complete yet ({ckpt.reason}), skipped[/]")
            if ckpt.step not in outcome.incomplete:
                outcome.incomplete.append(ckpt.step)
            continue
        if lazy and ckpt.step not in comparable:
            todo.append((ckpt, _HASHER.submit(_content_hash, config, ckpt)))
            continue
        digest = _content_hash(config, ckpt)
        if already_done(config, digest, ckpt.step, done):
            outcome.skipped.append(ckpt.step)
            continue
        todo.append((ckpt, digest))
    if outcome.skipped:
        console.print(f"already stored (same checkpoint and config): steps {outcome.skipped}")
    return todo


def _content_hash(config: Config, ckpt: ckpts.Checkpoint) -> str:
    return ckpts.content_digest(ckpt) if ckpt.kind != "base" else _base_hash(config)


def resolved(digest: str | Future) -> str | None:
    """A content hash, waiting for a background one; a checkpoint that cannot be hashed
    (e.g. a corrupt file) is recorded without one (its load error says what is wrong)."""
    if not isinstance(digest, Future):
        return digest
    try:
        return digest.result()
    except Exception as exc:
        log.warning("could not hash the checkpoint: %s", exc)
        return None


def _base_hash(config: Config) -> str:
    base = Path(config.base_model)
    return ckpts.checkpoint_hash(base) if base.is_dir() else f"hub:{config.base_model}"
