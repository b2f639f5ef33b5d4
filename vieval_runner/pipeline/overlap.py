"""The runner's throughput machinery: work done once per run, and CPU work overlapped with
the accelerator's.

- ``prepare``: processor outputs for the split once per run, on ``preprocess_workers``
  threads, in RAM up to ``prepare_cache_ram_mb`` and on disk beyond it, and with
  ``reuse_prepared`` kept for (or reused from) later runs (``prepared_reuse``); the vision
  embedding cache (``cache_vision``) is installed on the model here.
- ``start_prefetch`` / ``take_prefetched``: the next full checkpoint's tensors are read on a
  background thread while the current one generates.
- ``generate_and_parse``: generation on the calling thread; decoding and parsing of batch k
  on a helper thread while batch k+1 generates. Scoring stays batched per step (the runner).
- ``Committer``: the store commit of step N runs on a background thread while step N+1
  generates; at most one commit in flight, in step order; a failed commit is reported to
  ``on_error`` (the runner marks that step failed).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vieval_runner.checkpoints import Checkpoint

if TYPE_CHECKING:
    from vieval_runner.generate.embedding_cache import VisionCache

log = logging.getLogger("vieval")


@dataclass
class State:
    """Per-session state of the overlapped work (``Session.overlap``)."""

    vision_cache: VisionCache | None = None  # image embeddings of frozen vision towers
    prefetch: tuple[Path, Future] | None = None  # (checkpoint path, future CheckpointTensors)
    prepare_s: float | None = None  # preparing (or reusing) the split's processor outputs
    prepare_reused: bool = False  # they came from an earlier run (prepared_reuse)
    committer: Committer | None = None
    # the checkpoint evaluated next (None: there is none); unknown until the runner says
    following: Checkpoint | None = None
    following_known: bool = False
    memo: dict = field(default_factory=dict)  # batch size found by the auto probe
    noted: set = field(default_factory=set)
    first_chunk: list | None = None  # the split's first prepared specimens (early check)
    first_chunk_ready: threading.Event = field(default_factory=threading.Event)


def state(session) -> State:
    """The session's overlap state (``Session.overlap``)."""
    return session.overlap


def prepare(session) -> None:
    """Prepare the split once (thread pool, RAM budget, disk beyond) and set up the caches."""
    prepare_inputs(session, session.loaded)
    install_caches(session)


def prepare_inputs(session, loaded, cancel=None) -> None:
    """``session.prepared``: the split's processor outputs (needs only ``loaded``'s processor
    and family, so it can run while the weights load; ``cancel`` stops it)."""
    from vieval_runner.prepare import inputs

    config = session.config
    st = state(session)

    def first_chunk(items: list) -> None:  # for check_decoding_early
        st.first_chunk = items
        st.first_chunk_ready.set()

    t0 = time.perf_counter()
    if config.reuse_prepared and config.prepared_cache_max_gb > 0:
        from vieval_runner.prepare.reuse import prepare_reusing

        # kept on local disk across runs: a later run on the same split reads them back
        session.prepared, line = prepare_reusing(
            loaded, session.specimens, config, cancel, on_first=first_chunk,
            background_save=True, pixel_dtype=pixel_dtype(config, loaded),
        )  # fmt: skip
        log.info(line)
        state(session).prepare_reused = line.startswith("prepared inputs reused")
    else:
        session.prepared = inputs.prepare(
            loaded,
            session.specimens,
            template=config.prompt_template,
            system_prompt=config.system_prompt,
            workers=config.preprocess_workers,
            ram_budget_mb=config.prepare_cache_ram_mb,
            cache_dir=config.cache_dir,
            cancel=cancel,
            on_first=first_chunk,
            pixel_dtype=pixel_dtype(config, loaded),
        )
        on_disk = getattr(session.prepared, "on_disk", 0)
        log.info(
            "prepared %d specimens in %.2fs (%d on disk)",
            len(session.specimens),
            time.perf_counter() - t0,
            on_disk,
        )
    state(session).prepare_s = time.perf_counter() - t0


def pixel_dtype(config, loaded) -> torch.dtype | None:
    """The dtype prepared pixel values are kept in: the model's when it is a 16-bit float,
    else None (as the processor gives). ``loaded``: the model, or only its processor while
    the weights load; then the dtype the config will load them in."""
    from vieval_runner.model import loading as models

    if getattr(loaded, "model", None) is not None:  # e.g. the training callback's live model
        dtype = loaded.dtype
    else:
        dtype = models.resolve_dtype(config.dtype, models.resolve_device(config.device))
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def install_caches(session) -> None:
    """The vision-embedding cache on the loaded model (``cache_vision``)."""
    config = session.config
    session.loaded.hash_vision = config.cache_vision  # hashing only feeds the cache
    if config.cache_vision and state(session).vision_cache is None:
        from vieval_runner.generate.embedding_cache import VisionCache
        from vieval_runner.model.vision_hash import current_vision_hash

        state(session).vision_cache = VisionCache(
            session.loaded, current_vision_hash, config.vision_cache_ram_mb
        )


def start_prefetch(session, ckpt, first: bool = False) -> None:
    """Read ``ckpt``'s tensors in the background (full checkpoints only, ``prefetch: true``).

    ``first``: the run's first checkpoint, whose read the first step waits for: its tensors
    are not pinned (page-locking a fresh ~4 GB costs about what the faster copy saves, and
    here nothing hides it; later reads run behind generation, reuse the pinned blocks of
    PyTorch's host allocator, and are pinned)."""
    from vieval_runner.model import prefetch

    st = state(session)
    st.following, st.following_known = ckpt, True
    if not session.config.prefetch or ckpt is None or ckpt.kind != "full":
        return
    from vieval_runner import checkpoints as ckpts

    if not ckpts.is_local(ckpt):  # a remote checkpoint not downloaded yet: read it later
        return
    if st.prefetch is not None and st.prefetch[0] == Path(ckpt.path):
        return
    pin = False if first else None
    st.prefetch = (Path(ckpt.path), prefetch.prefetch_checkpoint(session.loaded, ckpt.path, pin))


def take_prefetched(session, ckpt):
    """The prefetched tensors of ``ckpt`` (waits for the read), or None; read errors raise."""
    st = state(session)
    if st.prefetch is None or st.prefetch[0] != Path(ckpt.path):
        return None
    _, future = st.prefetch
    st.prefetch = None
    return future.result()


def wait_for_saving(session) -> None:
    """Wait until the prepared inputs are saved for later runs (``prepare_reusing``'s
    background save), so a run returns with its cache entry in place."""
    saving = getattr(session.prepared, "saving", None)
    if saving is not None:
        saving.result()


def vision_cache_for_step(session):
    """The session's vision-embedding cache (None: off), refreshed for the weights now
    resident: a changed vision hash empties it; it keeps embeddings only where
    ``embeddings_wanted`` says a later checkpoint can use them."""
    st = state(session)
    cache = st.vision_cache
    if cache is not None:
        cache.refresh()
        owner = weakref.ref(session)  # no cycle: the session's inputs go with the session
        cache.wanted = lambda: (s := owner()) is not None and embeddings_wanted(s)
        if cache.note and "vision" not in st.noted:
            log.info(cache.note)
            st.noted.add("vision")
    return cache


def generate_and_parse(
    session, advance, timings: dict[str, float], parse: bool = True
) -> tuple[list, list | None]:
    """``(generated, predictions)`` aligned with ``session.specimens``.

    Parsing of each batch runs on the decoding thread while the next batch generates
    (``parse=False``: no parsing, predictions None; ranks leave it to rank 0). With
    ``batch_size: auto`` the first call probes and later calls reuse what fitted (``memo``).
    """
    from vieval_runner.generate import batches as generation
    from vieval_runner.pipeline.results import parse_one

    config = session.config
    st = state(session)
    cache = vision_cache_for_step(session)
    specimens = session.specimens
    predictions: list = [None] * len(specimens)
    parse_time = [0.0]

    def parse_batch(indices: list[int], texts: list) -> None:
        t0 = time.perf_counter()
        for i, out in zip(indices, texts, strict=True):
            predictions[i] = parse_one(session, specimens[i], out)
        parse_time[0] += time.perf_counter() - t0

    options = generate_options(config, cache)
    hits = cache.hits if cache is not None else 0
    t0 = time.perf_counter()
    batch_size = st.memo.get("batch_size", config.batch_size)
    if batch_size == "auto":
        log.info("batch_size auto: probing the largest batch that fits")
    threads, previous = generation_threads(config, session.loaded), torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        generated = generation.generate(
            session.loaded,
            session.prepared,
            batch_size=batch_size,
            max_new_tokens=config.max_new_tokens,
            progress=advance,
            on_batch=parse_batch if parse else None,
            options=options,
            memo=st.memo,
        )
    finally:
        if threads is not None:  # the caller's setting (e.g. a Trainer's) comes back
            torch.set_num_threads(previous)
    timings["generate_s"] = time.perf_counter() - t0
    if cache is not None:  # a count, not a time: logged, kept out of the timings
        log.info("vision embeddings reused for %d specimens", cache.hits - hits)
    if not parse:
        return generated, None
    timings["parse_s"] = parse_time[0]  # overlapped with generation
    return generated, predictions


def embeddings_wanted(session) -> bool:
    """Whether image embeddings computed now can serve a later checkpoint: not when the run
    has no next one (``watch`` and the training callback always may), nor when the next
    one's prefetched vision part hashes differently. Unknown (not read yet) counts as yes."""
    st = state(session)
    following = st.following
    if not st.following_known:
        return True
    if following is None:
        return session.open_ended
    pending = st.prefetch
    if pending is None or pending[0] != Path(following.path) or not pending[1].done():
        return True
    if pending[1].exception() is not None:
        return True
    digest = pending[1].result().vision_hash
    return digest is None or digest == st.vision_cache.digest


def generate_options(config, vision_cache=None):
    """The run's ``GenerateOptions``."""
    from vieval_runner.generate.options import GenerateOptions

    return GenerateOptions(
        static_cache=config.static_cache,
        cuda_graphs=config.cuda_graphs,
        compile=config.compile,
        vision_cache=vision_cache,
        overlap=config.overlap,
        scores=config.box_scores,
        lean=config.lean_decoding,
    )


def check_decoding_early(session, preparing: Future) -> None:
    """The lean loop's one-time check (``decoding.check_lean``) while the split is still being
    prepared, on the first prepared chunk's longest and shortest prompt, instead of holding up
    the first batch (which needs the whole split). Nothing to do once preparing has ended."""
    from vieval_runner.generate import batches as generation
    from vieval_runner.generate import decoding

    st = state(session)
    preparing.add_done_callback(lambda _: st.first_chunk_ready.set())
    st.first_chunk_ready.wait()
    chunk, config, loaded = st.first_chunk, session.config, session.loaded
    options = generate_options(config)
    st.first_chunk = None  # held for this check only
    if preparing.done() or not chunk or len(chunk) < 2:
        return
    if decoding.lean_blocker(loaded, options) is not None:
        return  # HF generate anyway (the first batch says why)
    by_length = sorted(chunk, key=lambda p: -p.prompt_len)
    part = decoding.to_device(loaded, generation.collate(loaded, [by_length[0], by_length[-1]]))
    threads, previous = generation_threads(config, loaded), torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # as generation runs
    try:
        with torch.inference_mode():
            decoding.check_lean(loaded, part, config.max_new_tokens, None, options)
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


def generation_threads(config, loaded) -> int | None:
    """torch threads for generating on the CPU (None: leave torch's setting).

    With ``overlap``, collating, decoding, parsing, prefetching and commits run on helper
    threads beside generation; if torch's workers take every core, each helper's slice stalls
    a whole parallel region (measured on 2 cores: a run 11 % slower, twice as variable).
    """
    if loaded.device.type != "cpu":
        return None
    if config.cpu_threads is not None:
        return config.cpu_threads
    cpus = os.cpu_count() or 1
    if not config.overlap or cpus < 2:
        return None
    return max(1, min(torch.get_num_threads(), cpus - 1))


class Committer:
    """Runs store commits on one background thread: in order, at most one in flight."""

    def __init__(self, on_error: Callable[[int, BaseException], None]) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vieval-commit")
        self._on_error = on_error
        self._inflight: tuple[int, Future] | None = None

    def submit(self, step: int, commit: Callable[[], None]) -> None:
        """Wait for the previous commit (reporting its error), then start ``commit``."""
        self.wait()
        self._inflight = (step, self._pool.submit(commit))

    def wait(self) -> None:
        """Wait for the commit in flight; a failure goes to ``on_error(step, exc)``."""
        if self._inflight is None:
            return
        step, future = self._inflight
        self._inflight = None
        try:
            future.result()
        except Exception as exc:
            self._on_error(step, exc)

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)
