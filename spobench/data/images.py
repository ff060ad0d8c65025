"""The one way spobench reads an image it did not just make: an image file (``eval``), or image bytes
from a table (Pick-a-Pic style parquets), refused with one line naming it when it is not a whole image.

The header is read first and the image is decoded only when its size is sane: a few KB of PNG can
declare a 1 x 1,000,000 canvas, which a resize to a metric's input makes gigabytes. Only raster
formats that a generator or a preference data set uses are opened (PIL would otherwise hand EPS files
to Ghostscript). Depends on Pillow and spobench.core.errors only, so any reader can use it.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

from spobench.core.errors import InputError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_PIXELS = 1 << 25  # ~33.5M pixels (5792 x 5792): 32x SDXL's 1024 x 1024, ~100 MB as RGB
MAX_ASPECT = 20  # wider than any generator's or data set's canvas; the 1 x 1e6 bomb is far past it

# decoder failures on malformed bytes: PIL reports them with all of these
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


class ImageInfo(NamedTuple):
    width: int
    height: int
    format: str


def _limit_pil() -> None:
    from PIL import Image

    # PIL checks the header's size in Image.open (warning above this, error above twice it; both are
    # refusals here) and again in the few plugins that learn a size only while decoding; set on every
    # call because any library may change it
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _source(source: str | Path | bytes, name: str | None) -> tuple[object, str]:
    """A file object or path PIL can open, and the name messages use; refuses non-files first."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "image bytes"
        if len(source) == 0:
            raise InputError(f"{label}: empty (0 bytes), not an image")
        return io.BytesIO(bytes(source)), label
    path = Path(source)
    label = name or str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{label}: image not found") from None
    except OSError as e:
        raise InputError(f"{label}: cannot read it: {e.strerror}") from None
    if path.is_dir():
        raise InputError(f"{label}: is a folder, not an image file")
    if not path.is_file():
        raise InputError(f"{label}: not a regular file")
    if st.st_size == 0:
        raise InputError(f"{label}: empty file (0 bytes), not an image")
    if not os.access(path, os.R_OK):
        raise InputError(f"{label}: cannot read it: permission denied")
    return path, label


def _check(im, label: str) -> ImageInfo:
    w, h = im.size  # (the pixel limit is normally PIL's own refusal in Image.open, before this)
    if w < 1 or h < 1:
        raise InputError(f"{label}: image is {w} x {h} pixels (empty)")
    if w * h > MAX_PIXELS:
        raise InputError(f"{label}: image is {w} x {h} pixels, more than the {MAX_PIXELS:,} spobench reads "
                         "(a decompression bomb, or not an image meant for a metric)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise InputError(f"{label}: image is {w} x {h} pixels, an aspect ratio over {MAX_ASPECT}:1 "
                         "(refused before decoding: resizing it would take far more memory than the file)")
    return ImageInfo(w, h, im.format)


def _open(src, label: str):
    from PIL import Image, UnidentifiedImageError

    _limit_pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(src, formats=FORMATS)
    except UnidentifiedImageError:
        raise InputError(f"{label}: not an image spobench reads ({', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(label, e) from None
    except _DECODE_ERRORS as e:
        raise InputError(f"{label}: not a readable image ({e})") from None


def _too_large(label: str, e: Exception) -> InputError:
    found = re.search(r"\((\d+) pixels\)", str(e))  # PIL says "Image size (N pixels) exceeds limit..."
    size = f"declares {int(found[1]):,} pixels, " if found else "has "
    return InputError(f"{label}: image {size}more than the {MAX_PIXELS:,} pixels spobench reads (refused from its "
                      "header: a decompression bomb?)")


def probe_image(source: str | Path | bytes, name: str | None = None) -> ImageInfo:
    """Width, height and format from the header alone, after the checks ``open_image`` makes before
    decoding (cheap: a whole folder can be checked before any scoring starts)."""
    src, label = _source(source, name)
    with _open(src, label) as im:
        return _check(im, label)


def open_image(source: str | Path | bytes, name: str | None = None, mode: str | None = "RGB"):
    """A fully decoded ``PIL.Image`` (in ``mode``; None keeps the file's) from a path or from bytes.

    ``name`` is what messages call the image (default: the path; pass e.g. ``"pairs.parquet row 7
    jpg_0"`` for bytes). Anything that is not a whole, sanely sized image of a known raster format is an
    :class:`InputError` naming it: a missing, empty or truncated file, a folder, a decompression bomb.
    """
    from PIL import Image, ImageFile

    src, label = _source(source, name)
    with _open(src, label) as im:
        _check(im, label)
        if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone asked PIL to pad truncated files with grey
            raise InputError(f"{label}: refusing to read images while PIL.ImageFile.LOAD_TRUNCATED_IMAGES "
                             "is set (a truncated file would be read as whole)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
                return im.convert(mode) if mode and im.mode != mode else im.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _too_large(label, e) from None
        except _DECODE_ERRORS as e:
            raise InputError(f"{label}: truncated or corrupt image ({e})") from None
