"""What the viewer shows, as JSON-ready dicts, read from one or more stores.

Reads only through ``vieval_runner.store.open_store`` (never writes, never globs). A store
that does not exist yet, or is being written, is retried; the last good state is kept so a
concurrent commit never turns into an error page.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from vieval_runner.viewer.analysis import (
    AGGREGATE_KEYS,
    GROUNDING_METRICS,
    PRIMARY,
    VQA_METRICS,
    best_and_overfit,
    clean,
    failure_actions,
)
from vieval_runner.viewer.rows import specimen_rows, step_rows

STEP_CACHE_SIZE = 64
PREFETCH_WAIT_S = 60.0  # a step request waits at most this long for the head start below


class StoreUnavailable(RuntimeError):
    """A read failed (for example during a concurrent commit); the client may retry."""


class _Store:
    """One store root, opened lazily and re-opened until its tables exist."""

    def __init__(self, root: str, index: int, label: str) -> None:
        self.root = root
        self.index = index
        self.label = label
        self.reader: Any = None
        self.error: str | None = None
        self.lock = threading.RLock()

    def open(self) -> Any:
        from vieval_runner.store import open_store

        with self.lock:
            if self.reader is None:
                try:
                    self.reader = open_store(self.root)
                    self.error = None
                except Exception as exc:  # missing/empty store: the waiting state, not an error
                    self.error = f"{type(exc).__name__}: {exc}"
            return self.reader


def _labels(roots: list[str]) -> list[str]:
    names = [Path(r.rstrip("/")).name or r for r in roots]
    if len(set(names)) == len(names):
        return names
    return [f"{n} [{i + 1}]" for i, n in enumerate(names)]


class ViewerData:
    """All JSON documents the page needs, with caching and last-good-state fallback."""

    def __init__(
        self,
        stores: list[str],
        poll_seconds: float = 2.0,
        retries: int = 3,
        prefetch: bool = True,
    ) -> None:
        if not stores:
            raise ValueError("the viewer needs at least one store path")
        roots = [str(s) for s in stores]
        self.stores = [
            _Store(r, i, lab) for i, (r, lab) in enumerate(zip(roots, _labels(roots), strict=True))
        ]
        self.poll_seconds = poll_seconds
        self.retries = retries
        self._lock = threading.RLock()
        self._last_refresh = 0.0
        self._meta: dict | None = None
        self._meta_key: str | None = None
        self._spec_index: dict[str, int] = {}  # specimen_id -> stable index (only grows)
        self._specimens: list[dict] = []
        self._spec_owner: list[int] = []  # store index holding each specimen's image
        self._spec_key: str | None = None
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

    # ----------------------------------------------------------------- reading helpers
    def _retry(self, store: _Store, fn):
        last: Exception | None = None
        for attempt in range(self.retries):
            try:
                with store.lock:
                    return fn(store.reader)
            except Exception as exc:  # a commit racing the read: refresh and try again
                last = exc
                time.sleep(0.05 * (attempt + 1))
                try:
                    with store.lock:
                        store.reader.refresh()
                except Exception:
                    pass
        raise StoreUnavailable(f"store {store.root}: {type(last).__name__}: {last}") from last

    def refresh(self, force: bool = False) -> None:
        """Re-read the Delta logs, at most once per half poll interval."""
        now = time.monotonic()
        if not force and now - self._last_refresh < self.poll_seconds / 2:
            return
        self._last_refresh = now
        for st in self.stores:
            if st.open() is None:
                continue
            try:
                with st.lock:
                    st.reader.refresh()
            except Exception:
                pass  # keep the previous snapshot; the next poll tries again

    def _versions(self) -> list[Any]:
        out = []
        for st in self.stores:
            try:
                out.append(clean(dict(st.reader.version)) if st.reader is not None else None)
            except Exception:
                out.append(None)
        return out

    # ----------------------------------------------------------------- specimens
    def _load_specimens(self) -> None:
        key = json.dumps(self._versions(), sort_keys=True, default=str)
        if key == self._spec_key:
            return
        for st in self.stores:
            if st.reader is None:
                continue
            try:
                # oldest first, so the newest dataset version of a specimen is the one kept
                recs = self._retry(st, lambda r: specimen_rows(r.specimens(with_images=False)))
            except StoreUnavailable:
                continue  # no specimens table yet
            for rec in recs:
                sid = rec["id"]
                idx = self._spec_index.get(sid)
                if idx is None:
                    idx = len(self._specimens)
                    self._spec_index[sid] = idx
                    self._specimens.append(rec | {"i": idx})
                    self._spec_owner.append(st.index)
                elif self._spec_owner[idx] == st.index:
                    # a newer dataset version of the same specimen in the same store wins
                    self._specimens[idx] = rec | {"i": idx}
        self._spec_key = key

    def _specimen_index(self, sid: str) -> int:
        idx = self._spec_index.get(sid)
        if idx is None:  # a prediction without a specimen row: show it, image-less
            idx = len(self._specimens)
            self._spec_index[sid] = idx
            self._specimens.append(
                {
                    "i": idx,
                    "id": sid,
                    "task": "grounding",
                    "prompt": "",
                    "width": None,
                    "height": None,
                    "ref_boxes": [],
                    "ref_answers": [],
                }
            )
            self._spec_owner.append(-1)
        return idx

    def specimens(self, url=None) -> dict:
        """The specimen list (no image bytes), each with its stable index ``i``.

        ``url(kind, i)`` names the image (``kind`` is ``img`` or ``thumb``); by default the
        server's ``img/<i>`` routes.
        """
        url = url or (lambda kind, i: f"{kind}/{i}")
        with self._lock:
            self.meta()
            out = []
            for s in self._specimens:
                i = s["i"]
                has = self._spec_owner[i] >= 0
                out.append(
                    s
                    | {
                        "img": url("img", i) if has else None,
                        "thumb": url("thumb", i) if has else None,
                    }
                )
            return {"rev": self._spec_key, "specimens": out}

    # ----------------------------------------------------------------- meta
    def _run_meta(self, st: _Store, run_id: str, key: str) -> dict:
        steps = [int(s) for s in self._retry(st, lambda r: r.steps(run_id))]
        evals = self._retry(st, lambda r: r.evaluations(run_id).to_pylist())
        eval_ids: dict[str, Any] = {}
        failed: dict[int, dict] = {}  # step -> its latest failure, unless a later one succeeded
        tasks = []
        for e in evals:  # oldest first: later evaluations of a step win
            if e.get("step") is None:
                continue
            step = int(e["step"])
            if e.get("status") == "failed":
                failed[step] = {"step": step, "error": e.get("error") or ""}
            else:
                failed.pop(step, None)
                eval_ids[str(step)] = e.get("eval_id")
                if e.get("task"):
                    tasks.append(e["task"])
        try:
            aggs = clean(self._retry(st, lambda r: r.aggregates(run_id).to_pylist()))
        except StoreUnavailable:
            aggs = []
        try:
            log = clean(self._retry(st, lambda r: r.training_log(run_id).to_pylist()))
        except StoreUnavailable:
            log = []
        log = [
            {k: row.get(k) for k in ("step", "loss", "eval_loss", "learning_rate", "epoch")}
            for row in log
            if row.get("step") is not None
        ]
        keep = ("step", "eval_id", "n_specimens", *AGGREGATE_KEYS)
        aggs = sorted(
            ({k: a.get(k) for k in keep if k in a} for a in aggs), key=lambda a: a.get("step", 0)
        )
        task = tasks[-1] if tasks and tasks[-1] in PRIMARY else self._run_task(aggs)
        best, overfit = best_and_overfit(aggs, PRIMARY[task])
        return {
            "key": key,
            "run_id": run_id,
            "store": st.index,
            "label": run_id if len(self.stores) == 1 else f"{run_id} · {st.label}",
            "task": task,
            "steps": sorted(steps),
            "eval_ids": eval_ids,
            "aggregates": aggs,
            "training_log": sorted(log, key=lambda r: r["step"]),
            "failed": clean(sorted(failed.values(), key=lambda f: f["step"])),
            "best": best,
            "overfitting": overfit,
        }

    def _run_task(self, aggs: list[dict]) -> str:
        tasks = {s["task"] for s in self._specimens}
        if tasks == {"vqa"}:
            return "vqa"
        if tasks == {"grounding"} or not aggs:
            return "grounding"
        has_g = any(a.get("f1") is not None for a in aggs)
        return "grounding" if has_g else "vqa"

    def meta(self) -> dict:
        """Stores, runs, steps, aggregates, training logs, best step, overfitting, waiting."""
        with self._lock:
            self.refresh()
            key = json.dumps(self._versions(), sort_keys=True, default=str)
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
        return {
            "waiting": True,
            "message": message,
            "stores": self._store_meta(),
            "runs": [],
            "task": None,
            "n_specimens": len(self._specimens),
            "failure_actions": failure_actions(),
            "poll_seconds": self.poll_seconds,
            "metrics": {"grounding": list(GROUNDING_METRICS), "vqa": list(VQA_METRICS)},
            "primary": PRIMARY,
            "rev": None,
        }

    def _store_meta(self) -> list[dict]:
        versions = self._versions()
        return [
            {
                "root": st.root,
                "label": st.label,
                "open": st.reader is not None,
                "error": st.error,
                "version": versions[st.index],
            }
            for st in self.stores
        ]

    def _build_meta(self, key: str) -> dict:
        self._load_specimens()
        runs = []
        for st in self.stores:
            if st.reader is None:
                continue
            try:
                run_ids = [str(r) for r in self._retry(st, lambda r: r.runs())]
            except StoreUnavailable:
                continue  # no predictions yet
            for run_id in run_ids:
                # keys never change once given, so the page's cached steps stay valid
                rkey = self._run_keys.setdefault((st.index, run_id), f"r{len(self._run_keys)}")
                runs.append(self._run_meta(st, run_id, rkey))
        tasks = {s["task"] for s in self._specimens} or {r["task"] for r in runs}
        evaluated = [r for r in runs if r["steps"]]
        meta = self._waiting("Waiting for the first checkpoint to be evaluated…")
        meta.update(
            waiting=not evaluated,
            runs=runs,
            task=tasks.pop() if len(tasks) == 1 else ("mixed" if tasks else None),
            rev=key,
            n_specimens=len(self._specimens),
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
        table = self._retry(st, lambda r: r.step(run["run_id"], step))
        with self._lock:
            # column-wise (10,000 rows per step): rows with the matched reference and IoU per
            # predicted box, as scoring matched them
            out = step_rows(table, self._specimen_index, lambda i: self._specimens[i]["ref_boxes"])
            doc = {"run": run_key, "step": step, "eval_id": eval_id, "rows": out}
            self._steps[ckey] = doc
            while len(self._steps) > STEP_CACHE_SIZE:
                self._steps.popitem(last=False)
            return doc

    # ----------------------------------------------------------------- images
    def image(self, index: int) -> bytes | None:
        """Embedded image bytes of specimen ``index`` (looked up in the store, never a path)."""
        with self._lock:
            self.meta()
            if not 0 <= index < len(self._specimens) or self._spec_owner[index] < 0:
                return None
            st = self.stores[self._spec_owner[index]]
            sid = self._specimens[index]["id"]
        try:
            return self._retry(st, lambda r: r.specimen_image(sid))
        except StoreUnavailable:
            return None

    def thumb(self, index: int, px: int = 112) -> bytes | None:
        """A small JPEG of specimen ``index`` for the list (cached)."""
        with self._lock:
            if index in self._thumbs:
                return self._thumbs[index]
        data = self.image(index)
        if data is not None:
            try:
                from PIL import Image

                img = Image.open(io.BytesIO(data)).convert("RGB")
                img.thumbnail((px, px))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=80)
                data = buf.getvalue()
            except Exception:
                pass  # undecodable: serve the original bytes, the browser may still cope
        with self._lock:
            self._thumbs[index] = data
            while len(self._thumbs) > 4096:
                self._thumbs.popitem(last=False)
        return data
