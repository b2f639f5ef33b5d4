"""What the viewer shows, as JSON-ready dicts, read from one or more stores.

Composes the stores (``stores``), the specimen index (``specimens``) and the meta document's
parts (``meta``) with the caches: the meta document per store version, the last
``STEP_CACHE_SIZE`` step documents and the thumbnails. A store that does not exist yet, or is
being written, is retried; the last good state is kept so a concurrent commit never turns into
an error page.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from vieval_runner.viewer.evidence import breakdowns
from vieval_runner.viewer.evidence import compare as compare_steps
from vieval_runner.viewer.meta import run_meta, waiting_meta
from vieval_runner.viewer.rows import step_rows
from vieval_runner.viewer.specimens import SpecimenIndex, make_thumb
from vieval_runner.viewer.stores import StoreHandle, StoreUnavailable, open_handles

__all__ = ["PREFETCH_WAIT_S", "STEP_CACHE_SIZE", "StoreUnavailable", "ViewerData"]

STEP_CACHE_SIZE = 64
THUMB_CACHE_SIZE = 4096
PREFETCH_WAIT_S = 60.0  # a step request waits at most this long for the head start below


class ViewerData:
    """All JSON documents the page needs, with caching and last-good-state fallback."""

    def __init__(
        self,
        stores: list[str],
        poll_seconds: float = 2.0,
        retries: int = 3,
        prefetch: bool = True,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        if not stores:
            raise ValueError("the viewer needs at least one store path")
        self.stores: list[StoreHandle] = open_handles([str(s) for s in stores], storage_options)
        self.poll_seconds = poll_seconds
        self.retries = retries
        self._lock = threading.RLock()
        self._last_refresh = 0.0
        self._meta: dict | None = None
        self._meta_key: str | None = None
        self._specimens = SpecimenIndex()
        self._run_keys: dict[tuple[int, str], str] = {}  # (store index, run_id) -> run key
        self._steps: OrderedDict[tuple, dict] = OrderedDict()
        self._thumbs: OrderedDict[int, bytes | None] = OrderedDict()
        self.prefetched = threading.Event()  # set once the head start below has finished
        if prefetch:
            threading.Thread(target=self._prefetch, name="viewer-prefetch", daemon=True).start()
        else:
            self.prefetched.set()

    def _prefetch(self) -> None:
        """Build the page's first view (meta, specimens, the latest step of the runs it shows
        first) before anyone asks: at 10,000 specimens that is most of the first-view wait,
        and it overlaps the user opening the URL (docs/benchmarks.md)."""
        try:
            shown = [r for r in self.meta()["runs"] if r["steps"]][:3]  # as app.js picks them
            if shown:
                latest = max(max(r["steps"]) for r in shown)
                for run in shown:
                    if latest in run["steps"]:
                        self._step(run["key"], latest)
        except Exception:
            pass  # only a head start: the request path retries and reports errors
        finally:
            self.prefetched.set()

    # ----------------------------------------------------------------- store state
    def refresh(self, force: bool = False) -> None:
        """Re-read the Delta logs, at most once per half poll interval."""
        now = time.monotonic()
        if not force and now - self._last_refresh < self.poll_seconds / 2:
            return
        self._last_refresh = now
        for st in self.stores:
            st.refresh()

    def _versions_key(self) -> str:
        return json.dumps([st.version() for st in self.stores], sort_keys=True, default=str)

    # ----------------------------------------------------------------- specimens
    def specimens(self, url: Callable[[str, int], str] | None = None) -> dict:
        """The specimen list (no image bytes), each with its stable index ``i``.

        ``url(kind, i)`` names the image (``kind`` is ``img`` or ``thumb``); by default the
        server's ``img/<i>`` routes.
        """
        url = url or (lambda kind, i: f"{kind}/{i}")
        with self._lock:
            self.meta()
            return {"rev": self._specimens.key, "specimens": self._specimens.listing(url)}

    # ----------------------------------------------------------------- meta
    def meta(self) -> dict:
        """Stores, runs, steps, aggregates, training logs, best step, overfitting, waiting."""
        with self._lock:
            self.refresh()
            key = self._versions_key()
            if self._meta is not None and key == self._meta_key:
                return self._meta
            try:
                meta = self._build_meta(key)
            except StoreUnavailable as exc:
                if self._meta is None:
                    return self._waiting(f"store not readable yet ({exc})")
                return self._meta | {"stale": True, "error": str(exc)}
            self._meta, self._meta_key = meta, key
            return meta

    def _waiting(self, message: str) -> dict:
        n = len(self._specimens.records)
        return waiting_meta(message, self.stores, n, self.poll_seconds)

    def _build_meta(self, key: str) -> dict:
        self._specimens.load(self.stores, key, self.retries)
        spec_tasks = self._specimens.tasks()
        runs = []
        for st in self.stores:
            if st.reader is None:
                continue
            try:
                run_ids = [str(r) for r in st.read(lambda r: r.runs(), self.retries)]
            except StoreUnavailable:
                continue  # no predictions yet
            for run_id in run_ids:
                # keys never change once given, so the page's cached steps stay valid
                rkey = self._run_keys.setdefault((st.index, run_id), f"r{len(self._run_keys)}")
                label = run_id if len(self.stores) == 1 else f"{run_id} · {st.label}"
                runs.append(run_meta(st, run_id, rkey, label, spec_tasks, self.retries))
        tasks = spec_tasks or {r["task"] for r in runs}
        evaluated = [r for r in runs if r["steps"]]
        meta = self._waiting("Waiting for the first checkpoint to be evaluated…")
        meta.update(
            waiting=not evaluated,
            runs=runs,
            task=tasks.pop() if len(tasks) == 1 else ("mixed" if tasks else None),
            rev=key,
            n_specimens=len(self._specimens.records),
        )
        if not any(st.reader is not None for st in self.stores):
            meta["message"] = (
                "Waiting for the first checkpoint to be evaluated… (no store at "
                + ", ".join(st.root for st in self.stores)
                + " yet)"
            )
        return meta

    # ----------------------------------------------------------------- steps
    def step(self, run_key: str, step: int) -> dict:
        """Every specimen's prediction for one run at one step. KeyError if unknown."""
        # wait for the prefetch rather than build the same step twice at once
        self.prefetched.wait(PREFETCH_WAIT_S)
        return self._step(run_key, step)

    def _step(self, run_key: str, step: int) -> dict:
        with self._lock:
            meta = self.meta()
            run = next((r for r in meta["runs"] if r["key"] == run_key), None)
            if run is None or step not in run["steps"]:
                raise KeyError(f"no evaluation of run {run_key!r} at step {step}")
            st = self.stores[run["store"]]
            eval_id = run["eval_ids"].get(str(step))
            ckey = (run["store"], run["run_id"], step, eval_id)
            if ckey in self._steps:
                self._steps.move_to_end(ckey)
                return self._steps[ckey]
        table = st.read(lambda r: r.step(run["run_id"], step), self.retries)
        with self._lock:
            # column-wise (10,000 rows per step): rows with the matched reference and IoU per
            # predicted box, as scoring matched them
            specs = self._specimens
            out = step_rows(table, specs.index_of, lambda i: specs.records[i]["ref_boxes"])
            doc = {"run": run_key, "step": step, "eval_id": eval_id, "rows": out,
                   "breakdown": breakdowns(out, specs.records, run["task"])}  # fmt: skip
            self._steps[ckey] = doc
            while len(self._steps) > STEP_CACHE_SIZE:
                self._steps.popitem(last=False)
            return doc

    def compare(self, run_key: str, step_a: int, step_b: int) -> dict:
        """Run-level paired comparison of two steps on the primary metric. KeyError if unknown."""
        meta = self.meta()
        run = next((r for r in meta["runs"] if r["key"] == run_key), None)
        if run is None or step_a not in run["steps"] or step_b not in run["steps"]:
            raise KeyError(f"no evaluations of run {run_key!r} at steps {step_a} and {step_b}")
        st = self.stores[run["store"]]
        metric = meta["primary"][run["task"]]
        read = lambda s: st.read(lambda r: r.step(run["run_id"], s), self.retries)  # noqa: E731
        return compare_steps(read, run["task"], metric, step_a, step_b)

    # ----------------------------------------------------------------- images
    def image(self, index: int) -> bytes | None:
        """Embedded image bytes of specimen ``index`` (looked up in the store, never a path)."""
        with self._lock:
            self.meta()
            source = self._specimens.image_source(index)
            if source is None:
                return None
            st, sid = self.stores[source[0]], source[1]
        try:
            return st.read(lambda r: r.specimen_image(sid), self.retries)
        except StoreUnavailable:
            return None

    def thumb(self, index: int, px: int = 112) -> bytes | None:
        """A small JPEG of specimen ``index`` for the list (cached)."""
        with self._lock:
            if index in self._thumbs:
                return self._thumbs[index]
        data = self.image(index)
        if data is not None:
            data = make_thumb(data, px)
        with self._lock:
            self._thumbs[index] = data
            while len(self._thumbs) > THUMB_CACHE_SIZE:
                self._thumbs.popitem(last=False)
        return data
