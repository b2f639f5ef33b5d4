"""The viewer's specimen list: a stable index per specimen id across stores, and thumbnails.

Indexes only grow, so a page that cached steps by index stays valid as stores change.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from vieval_runner.viewer.rows import specimen_rows
from vieval_runner.viewer.stores import StoreHandle, StoreUnavailable

NO_OWNER = -1  # a specimen seen only in predictions: no store holds its image


class SpecimenIndex:
    """Specimen records (no image bytes) by stable index ``i``, with the store holding each."""

    def __init__(self) -> None:
        self.by_id: dict[str, int] = {}  # specimen_id -> stable index (only grows)
        self.records: list[dict] = []
        self.owner: list[int] = []  # store index holding each specimen's image
        self.key: str | None = None  # the store versions the records were read at

    def load(self, stores: list[StoreHandle], key: str, retries: int) -> None:
        """Read every open store's specimens unless already read at versions ``key``."""
        if key == self.key:
            return
        for st in stores:
            if st.reader is None:
                continue
            try:
                # oldest first, so the newest dataset version of a specimen is the one kept
                recs = st.read(lambda r: specimen_rows(r.specimens(with_images=False)), retries)
            except StoreUnavailable:
                continue  # no specimens table yet
            for rec in recs:
                sid = rec["id"]
                idx = self.by_id.get(sid)
                if idx is None:
                    idx = len(self.records)
                    self.by_id[sid] = idx
                    self.records.append(rec | {"i": idx})
                    self.owner.append(st.index)
                elif self.owner[idx] == st.index:
                    # a newer dataset version of the same specimen in the same store wins
                    self.records[idx] = rec | {"i": idx}
        self.key = key

    def index_of(self, sid: str) -> int:
        """The stable index of ``sid``; a prediction without a specimen row gets an image-less
        placeholder so it is still shown."""
        idx = self.by_id.get(sid)
        if idx is None:
            idx = len(self.records)
            self.by_id[sid] = idx
            self.records.append(
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
            self.owner.append(NO_OWNER)
        return idx

    def tasks(self) -> set[str]:
        """The tasks of all known specimens."""
        return {s["task"] for s in self.records}

    def listing(self, url: Callable[[str, int], str]) -> list[dict]:
        """Every record with its ``img`` and ``thumb`` URLs (None when no store has the image)."""
        out = []
        for s in self.records:
            i = s["i"]
            has = self.owner[i] >= 0
            out.append(
                s
                | {"img": url("img", i) if has else None, "thumb": url("thumb", i) if has else None}
            )
        return out

    def image_source(self, index: int) -> tuple[int, str] | None:
        """(store index, specimen id) holding the image of ``index``, or None."""
        if not 0 <= index < len(self.records) or self.owner[index] < 0:
            return None
        return self.owner[index], self.records[index]["id"]


def make_thumb(data: bytes, px: int) -> bytes:
    """A JPEG of ``data`` fitting ``px`` x ``px``; undecodable bytes come back unchanged (the
    browser may still cope)."""
    try:
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.thumbnail((px, px))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return buf.getvalue()
    except Exception:
        return data
