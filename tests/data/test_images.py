"""spobench.data.images: the one image opener, for files and for bytes; every refusal names the image."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from spobench.core.errors import InputError
from spobench.data.images import MAX_ASPECT, MAX_PIXELS, open_image, probe_image


def png_bytes(size=(8, 6), color=(10, 200, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buf, format="PNG")
    return buf.getvalue()


def with_header_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming another size (and a valid CRC): a bomb costs a few bytes."""
    assert png[12:16] == b"IHDR"
    data = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + data + struct.pack(">I", zlib.crc32(b"IHDR" + data)) + png[33:]


def test_reads_a_file_and_bytes_alike(tmp_path):
    data = png_bytes()
    (tmp_path / "a.png").write_bytes(data)
    from_file = open_image(tmp_path / "a.png")
    from_bytes = open_image(data, name="pairs.parquet row 0 jpg_0")
    assert from_file.size == from_bytes.size == (8, 6) and from_file.mode == "RGB"
    assert np.array_equal(np.asarray(from_file), np.asarray(from_bytes))
    assert np.asarray(from_file)[0, 0].tolist() == [10, 200, 30]
    assert probe_image(data).width == 8 and probe_image(tmp_path / "a.png").format == "PNG"


def test_mode_conversion_and_keeping_the_files_mode():
    grey = png_bytes(mode="L")
    assert open_image(grey).mode == "RGB"
    assert open_image(grey, mode=None).mode == "L"


def test_a_decoded_image_outlives_its_file(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    im = open_image(tmp_path / "a.png")
    (tmp_path / "a.png").unlink()
    assert im.getpixel((0, 0)) == (10, 200, 30)


@pytest.mark.parametrize("case, message", [
    ("truncated", "truncated or corrupt"),
    ("empty", "0 bytes"),
    ("folder", "is a folder"),
    ("missing", "not found"),
    ("text", "not an image"),
    ("eps", "not an image"),
    ("huge", "more than the"),
    ("thin", "aspect ratio"),
])
def test_bad_files_are_one_line_naming_the_file(tmp_path, case, message):
    path = tmp_path / "x.png"
    data = png_bytes((64, 64))
    if case == "truncated":
        noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.mkdir()
    elif case == "text":
        path.write_text("not an image at all\n")
    elif case == "eps":  # PIL would hand this to Ghostscript
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    elif case == "huge":
        path.write_bytes(with_header_size(data, 60_000, 60_000))
    elif case == "thin":
        path.write_bytes(with_header_size(data, 1, 1_000_000))
    with pytest.raises(InputError, match=message) as err:
        open_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_bomb_is_refused_from_the_header_before_decoding(monkeypatch):
    """The 1 x 1,000,000 PNG of the issue: refused without ever calling the decoder."""
    buf = io.BytesIO()
    Image.new("L", (1, 1_000_000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 20_000  # a few KB on disk

    def no_decoding(self, *a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InputError, match="aspect ratio") as err:
        open_image(buf.getvalue(), name="pairs.parquet row 3 jpg_1")
    assert "pairs.parquet row 3 jpg_1" in str(err.value) and "1 x 1000000" in str(err.value)


def test_limits_are_inclusive_and_sane():
    side = int(MAX_PIXELS ** 0.5)
    assert side >= 4096  # SDXL sized images and far more pass
    ok = with_header_size(png_bytes(), MAX_ASPECT * 50, 50)
    assert probe_image(ok).width == MAX_ASPECT * 50
    with pytest.raises(InputError, match="aspect"):
        probe_image(with_header_size(png_bytes(), MAX_ASPECT * 50 + 1, 50))


def test_bytes_errors_use_the_given_name():
    with pytest.raises(InputError, match=r"^t.parquet row 2 jpg_0: empty"):
        open_image(b"", name="t.parquet row 2 jpg_0")
    with pytest.raises(InputError, match=r"^t.parquet row 2 jpg_1: not an image"):
        open_image(b"\x89PNG but not really", name="t.parquet row 2 jpg_1")
    with pytest.raises(InputError, match=r"^image bytes: truncated"):
        open_image(png_bytes((64, 64))[:60])


def test_refuses_while_pil_pads_truncated_files(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InputError, match="LOAD_TRUNCATED_IMAGES"):
        open_image(png_bytes(), name="a.png")
