"""The process group of a launched run (``accelerate launch`` / ``torchrun``): who this
rank is, joining and leaving the group, and the object collectives ``distributed.py`` uses.

Collectives carry small Python objects and always run over gloo (see ``distributed.py``).
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

log = logging.getLogger("vieval")

TIMEOUT_ENV = "VIEVAL_DIST_TIMEOUT_S"
# Longest a rank waits at a collective: rank 0 hashing every checkpoint and writing thumbnails
# before the plan broadcast is the longest legitimate wait. A dead rank ends sooner: the
# launcher stops the others, or gloo reports the closed connection.
DEFAULT_TIMEOUT_S = 7200.0


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """Processes in the launch (``WORLD_SIZE`` set by torchrun / accelerate launch; else 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def single_process_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) without the launcher's rank variables, for a
    ``vieval run`` started from inside a launched job (e.g. a Trainer callback on rank 0):
    otherwise the child would take itself for rank 0 of the training job's group."""
    out = dict(os.environ if env is None else env)
    for name in LAUNCH_VARIABLES:
        out.pop(name, None)
    return out


def env_ranks() -> Ranks | None:
    """Rank facts from the launcher's environment, or None in a one-process run."""
    size = world_size()
    if size <= 1:
        return None
    try:
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise RuntimeError(
            f"WORLD_SIZE={size} but RANK/LOCAL_RANK are missing or not integers ({exc}); "
            "launch with torchrun or accelerate launch"
        ) from None
    if not 0 <= rank < size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return Ranks(rank, size, local)


def setup() -> Ranks | None:
    """Join the launch's process group (gloo, ``env://``); None in a one-process run."""
    import torch.distributed as dist

    ranks = env_ranks()
    if ranks is None:
        return None
    if not dist.is_initialized():
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        atexit.register(_destroy)  # error exits skip finish(); free the group quietly
    return ranks


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def finish(ranks: Ranks | None) -> None:
    """Wait for every rank, then leave the group: launchers stop all ranks when the first one
    exits non-zero (status 3), which must not cut rank 0's summary short."""
    import torch.distributed as dist

    if ranks is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def tag_logs(ranks: Ranks | None) -> None:
    """Prefix this rank's log lines with its rank (each rank writes its own log file)."""
    if ranks is None:
        return
    fmt = logging.Formatter(f"%(asctime)s rank{ranks.rank} %(levelname)s %(message)s")
    for handler in logging.getLogger("vieval").handlers:
        handler.setFormatter(fmt)
    log.info(
        "rank %d of %d (local rank %d, host %s, pid %d)",
        ranks.rank,
        ranks.world_size,
        ranks.local_rank,
        os.uname().nodename,
        os.getpid(),
    )


# --- collectives ----------------------------------------------------------------------------


def broadcast(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: Any, ranks: Ranks) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 in rank order; None on the other ranks."""
    import torch.distributed as dist

    out = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any, ranks: Ranks) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, obj)
    return out


def portable(exc: BaseException | None) -> BaseException | None:
    """The exception itself if it survives pickling (so other ranks raise the same type and
    the CLI maps it to the same exit status), else a RuntimeError with its message."""
    if exc is None:
        return None
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def with_rank(exc: BaseException, rank: int) -> BaseException:
    try:
        return type(exc)(f"rank {rank}: {exc}")
    except Exception:  # an exception type whose constructor wants other arguments
        return exc


def run_step(
    ranks: Ranks, work: Callable[[], Any], finish_main: Callable[[list[Any]], None]
) -> str | None:
    """Run ``work()`` on every rank, hand the results (rank order) to ``finish_main`` on rank 0.

    Returns None when every rank and rank 0's ``finish_main`` succeeded, else the error
    message, identical on every rank. Exceptions never escape before the collectives, so a
    failing rank cannot leave the others waiting.
    """
    try:
        payload: tuple[str | None, Any] = (None, work())
    except Exception as exc:  # OOM that cannot be halved, a load error, ...
        log.exception("rank %d failed its shard", ranks.rank)
        payload = (f"rank {ranks.rank}: {type(exc).__name__}: {exc}", None)
    gathered = gather(payload, ranks)
    verdict = None
    if ranks.is_main:
        errors = [err for err, _ in gathered if err]
        if errors:
            verdict = "; ".join(errors)
        else:
            try:
                finish_main([result for _, result in gathered])
            except Exception as exc:
                log.exception("rank 0 could not finish the step")
                verdict = f"{type(exc).__name__}: {exc}"
    return broadcast(verdict)


# --- sharding and devices -------------------------------------------------------------------
