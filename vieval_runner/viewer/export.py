"""Static export: the viewer page as plain files that open from disk (``file://``).

Browsers block ``fetch`` of ``file://`` URLs, so the JSON documents are written as scripts
(``window.__VIEVAL_DATA__[name] = {...}``) that the same ``app.js`` loads with ``<script>``
tags; images are written as files next to them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vieval_runner.viewer.analysis import image_type
from vieval_runner.viewer.data import ViewerData
from vieval_runner.viewer.server import STATIC_DIR, STATIC_FILES

DATA_MARKER = "<!--DATA-->"
STATIC_ASSETS = sorted({name for name, _ in STATIC_FILES.values()} - {"index.html"})


def _write_js(path: Path, name: str, doc: dict) -> None:
    # ensure_ascii: U+2028/2029 and any non-ASCII model output stay inert inside the script.
    body = json.dumps(doc, allow_nan=False, ensure_ascii=True, separators=(",", ":"))
    path.write_text(
        "window.__VIEVAL_DATA__ = window.__VIEVAL_DATA__ || {};\n"
        f"window.__VIEVAL_DATA__[{json.dumps(name)}] = {body};\n",
        encoding="ascii",
    )


def export_html(
    stores: list[str] | str,
    out_dir: str | Path,
    storage_options: dict[str, str] | None = None,
) -> Path:
    """Write the viewer for ``stores`` as static files into ``out_dir``; return its index.html.

    Every evaluated step of every run is embedded, with each specimen's image and thumbnail.
    """
    roots = [stores] if isinstance(stores, str | Path) else list(stores)
    data = ViewerData([str(r) for r in roots], storage_options=storage_options)
    data.refresh(force=True)
    out = Path(out_dir)
    for sub in ("data", "img", "thumb"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    meta = dict(data.meta())
    meta["static"] = True

    names: dict[tuple[str, int], str] = {}
    for index in range(meta.get("n_specimens") or 0):
        for kind, read in (("img", data.image), ("thumb", data.thumb)):
            blob = read(index)
            if blob is None:
                continue
            name = f"{kind}/{index}.{image_type(blob)[1]}"
            (out / name).write_bytes(blob)
            names[(kind, index)] = name
    specimens = data.specimens(url=lambda kind, i: names.get((kind, i)))

    _write_js(out / "data" / "meta.js", "meta", meta)
    _write_js(out / "data" / "specimens.js", "specimens", specimens)
    for run in meta["runs"]:
        for step in run["steps"]:
            name = f"step-{run['key']}-{step}"
            _write_js(out / "data" / f"{name}.js", name, data.step(run["key"], step))

    for name in STATIC_ASSETS:
        shutil.copyfile(STATIC_DIR / name, out / name)
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    html = html.replace(DATA_MARKER, '<script src="data/meta.js"></script>')
    index = out / "index.html"
    index.write_text(html, encoding="utf-8")
    return index
