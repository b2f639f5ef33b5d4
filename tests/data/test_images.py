"""Huge images and decompression bombs are bad rows, found from the header before decoding."""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vieval_runner import cli
from vieval_runner.data import DataError, load_specimens
from vieval_runner.records import Specimen


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A real, valid PNG of ``width x height`` 1-bit grey pixels, written row by row through
    zlib so the test never holds the pixels (a 20000x20000 image is 400 MB once decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def write_split(folder: Path, bomb: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "ok.png")  # 1200 pixels
    rows = [
        {"id": "a", "image": "ok.png", "prompt": "red", "boxes": [[1, 1, 30, 30]]},
        {"id": "bomb", "image": bomb.name, "prompt": "red", "boxes": [[1, 1, 30, 30]]},
        {"id": "c", "image": "ok.png", "prompt": "square", "boxes": [[2, 2, 20, 20]]},
    ]
    path = folder / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_bomb_png_is_real(tmp_path):
    bomb = write_blank_png(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 200_000  # tiny on disk, 400 MB decoded
    with pytest.raises(Image.DecompressionBombError):  # what PIL itself makes of it
        Image.open(bomb)
    small = write_blank_png(tmp_path / "small.png", 30, 20)
    with Image.open(small) as img:  # the same writer, decoded for real
        assert img.size == (30, 20) and img.mode == "1" and img.getextrema() == (0, 0)


def test_20000_square_png_is_a_bad_row_naming_file_row_and_size(tmp_path):
    (tmp_path / "data").mkdir()
    bomb = write_blank_png(tmp_path / "data" / "bomb.png", 20000, 20000)
    split = write_split(tmp_path / "data", bomb)
    with pytest.raises(DataError) as info:
        load_specimens(split, task="grounding")
    message = str(info.value)
    assert str(split) in message and "line 2" in message and "'bomb'" in message
    assert "bomb.png is too large: 400,000,000 pixels, over data.max_image_pixels=89,478,485" in (
        message
    )
    loaded = load_specimens(split, task="grounding", strict=False)
    assert [s.specimen_id for s in loaded.specimens] == ["a", "c"]
    (bad,) = loaded.skipped
    assert bad.row == "line 2" and "too large" in bad.problem


def test_10000_square_png_is_rejected_from_its_header_without_pil_warnings(tmp_path):
    (tmp_path / "data").mkdir()
    big = write_blank_png(tmp_path / "data" / "big.png", 10000, 10000)
    split = write_split(tmp_path / "data", big)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_specimens(split, task="grounding", strict=False)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    (bad,) = loaded.skipped
    assert "big.png is 10000x10000 = 100,000,000 pixels, over data.max_image_pixels" in bad.problem


def test_a_raised_limit_accepts_the_image_and_pil_stays_quiet(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    (tmp_path / "data").mkdir()
    big = write_blank_png(tmp_path / "data" / "big.png", 10000, 10000)
    split = write_split(tmp_path / "data", big)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_specimens(split, task="grounding", max_image_pixels=100_000_000)
        with Image.open(big) as img:  # what decoding it later opens: no bomb warning either
            assert img.size == (10000, 10000)
    assert [s.specimen_id for s in loaded.specimens] == ["a", "bomb", "c"]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_the_pixel_limit_is_configurable(tmp_path):
    (tmp_path / "data").mkdir()
    mid = write_blank_png(tmp_path / "data" / "mid.png", 60, 50)  # 3000 pixels
    split = write_split(tmp_path / "data", mid)
    with pytest.raises(DataError, match=r"60x50 = 3,000 pixels, over data.max_image_pixels=2,999"):
        load_specimens(split, task="grounding", max_image_pixels=2999)
    loaded = load_specimens(split, task="grounding", max_image_pixels=3000)
    assert [s.specimen_id for s in loaded.specimens] == ["a", "bomb", "c"]


def test_an_rgb_image_is_decoded_once_not_copied(tmp_path):
    # PIL counts every image core it allocates: decode = 1; convert("RGB") of an RGB image
    # would be a second full-size copy (twice the peak memory of a huge image)
    Image.new("RGB", (300, 200), (1, 2, 3)).save(tmp_path / "rgb.png")
    Image.new("L", (300, 200), 7).save(tmp_path / "grey.png")
    for name, cores in (("rgb.png", 1), ("grey.png", 2)):
        spec = Specimen(name, "grounding", "p", 300, 200, image_path=str(tmp_path / name))
        before = Image.core.get_stats()["new_count"]
        img = spec.load_image()
        assert Image.core.get_stats()["new_count"] - before == cores
        assert img.mode == "RGB" and img.size == (300, 200)
    assert spec.load_image().getpixel((0, 0)) == (7, 7, 7)
    data = (tmp_path / "rgb.png").read_bytes()
    from_bytes = Specimen("b", "grounding", "p", 300, 200, image_bytes=data).load_image()
    assert from_bytes.getpixel((5, 5)) == (1, 2, 3)


def test_cli_run_exits_2_on_a_bomb_and_skips_it_with_strict_false(tmp_path, tiny_run, capsys):
    (tmp_path / "data").mkdir()
    bomb = write_blank_png(tmp_path / "data" / "bomb.png", 20000, 20000)
    split = write_split(tmp_path / "data", bomb)
    run = tiny_run("qwen25_vl")
    config = tmp_path / "config.yaml"
    tree = {
        "run_dir": str(run.run_dir),
        "base_model": str(run.base_model_dir),
        "store": str(tmp_path / "store"),
        "data": {"path": str(split)},
        "batch_size": 2,
        "max_new_tokens": 4,
        "device": "cpu",
        "steps": [0],
    }
    config.write_text(yaml.safe_dump(tree))
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "bomb.png is too large" in err and "Traceback" not in err
    assert cli.main(["run", str(config), "data.strict=false"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "skipped 1 bad rows" in out and "line 2" in out and "bomb.png" in out
