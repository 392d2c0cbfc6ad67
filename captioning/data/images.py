"""Load an untrusted image as a decoded 8-bit RGB picture, or fail with ImageLoadError.

Only JPEG, PNG, WebP, BMP, GIF and TIFF are decoded; Pillow's other decoders (EPS, which runs
Ghostscript, PSD, FITS, ...) are never run. With ``reduce_to`` the image is decoded at a reduced
resolution when it is larger (JPEG DCT scaling, then an integer box reduction in uint8), so a
huge photo never exists at full resolution as floats.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Pillow format id -> display name, in the order Image.open tries them.
ACCEPTED_FORMATS = {
    "JPEG": "JPEG",
    "PNG": "PNG",
    "WEBP": "WebP",
    "BMP": "BMP",
    "GIF": "GIF",
    "TIFF": "TIFF",
}
DEFAULT_MAX_PIXELS = 50_000_000
# With reduce_to, keep about (scale * reduce_to)^2 pixels so that the caller's antialiased resize
# does the final filtering: JPEG DCT scaling is a clean low-pass, a box reduction less so.
DRAFT_SCALE = 3
REDUCE_SCALE = 4
MIN_SIDE = 16  # with reduce_to: smaller images hold nothing to caption
MAX_ASPECT = 20  # with reduce_to: longest / shortest side; squashed to a square, more is noise

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_CHUNK_PIXELS = 1 << 20  # rows are converted in chunks of about this many pixels
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Formats Pillow cannot open at all, named by their first bytes so the refusal can say what it is.
_OTHER_SIGNATURES = {
    b"%PDF": "PDF",
    b"<svg": "SVG",
    b"<?xml": "XML/SVG",
    b"PK\x03\x04": "ZIP",
    b"\x1f\x8b": "gzip",
}
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"mif1", b"msf1")


class ImageLoadError(ValueError):
    """An image that cannot be used; the message names the source and says why."""


ImageSource = str | Path | bytes | BinaryIO | Image.Image


def load_image(
    src: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_to: int | None = None,
) -> Image.Image:
    """Decode ``src`` into a new RGB image.

    ``src`` is a path, raw bytes, a binary stream (e.g. an upload) or a PIL image. Files must be
    JPEG, PNG, WebP, BMP, GIF or TIFF; other formats are refused by name, without running their
    decoder. EXIF orientation is applied, animated images give their first frame, transparency
    is composited on white and 16-bit/float data is scaled to 8 bits. Images larger than
    ``max_pixels`` are refused from their header, before any pixels are decoded (Pillow's own
    decompression-bomb limit also applies).

    ``reduce_to`` is the side the caller will resize to (the encoders' 224). Larger images are
    then decoded smaller, keeping both sides at least ``reduce_to`` px (images already that small
    are untouched, bit for bit), and images no model can read are refused: a side under
    ``MIN_SIDE`` px or an aspect ratio over ``MAX_ASPECT``:1.

    ``name`` labels the source in error messages (default: the path, or "upload" for bytes and
    streams). Every failure is an :class:`ImageLoadError`.
    """
    label = _label(src, name)
    if isinstance(src, Image.Image):
        return _decode(src, label, max_pixels, reduce_to)
    fp = _open_source(src, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=list(ACCEPTED_FORMATS)) as img:
                return _decode(img, label, max_pixels, reduce_to)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise _unidentified(fp, label) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb_error(label, e, max_pixels) from None
    except Exception as e:  # untrusted input: any decoder failure means a bad image
        raise _decode_error(label, e) from e
    finally:
        fp.close()


def iter_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories into their image files; keep other paths as given.

    Directories are searched recursively for files whose extension (any case) is in
    ``IMAGE_EXTENSIONS``, sorted by path; hidden files and folders (name starting with ".")
    inside them are skipped. Non-directory paths are kept unchecked, in order, so that
    :func:`load_image` reports missing or unreadable ones.
    """
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if not path.is_dir():
            found.append(path)
            continue
        matches = [
            p
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and p.is_file()
        ]
        found.extend(sorted(matches))
    return found


def sniff_format(prefix: bytes) -> str | None:
    """The format the first bytes of a file announce (Pillow's id, e.g. "EPS"), or None.

    Only Pillow's signature checks run (no decoder), plus a few formats Pillow cannot open.
    """
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001, S112 - a signature check that chokes is no match
            continue
    for magic, fmt in _OTHER_SIGNATURES.items():
        if prefix.lstrip().startswith(magic):
            return fmt
    if prefix[4:8] == b"ftyp" and prefix[8:12] in _HEIF_BRANDS:
        return "HEIF"
    return None


def _label(src: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, Image.Image):
        return "image"
    return "upload"


def _open_source(src: str | Path | bytes | BinaryIO, label: str) -> BinaryIO:
    """Return a readable binary stream for ``src``, checking for missing and empty input."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        try:
            if path.is_dir():
                raise ImageLoadError(f"{label}: is a directory, not an image file")
            if path.stat().st_size == 0:
                raise ImageLoadError(f"{label}: empty file (0 bytes)")
            return open(path, "rb")  # closed by load_image
        except FileNotFoundError:
            raise ImageLoadError(f"{label}: file not found") from None
        except OSError as e:
            raise ImageLoadError(f"{label}: cannot open file ({e.strerror or e})") from None
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        try:
            data = src.read()
        except (OSError, ValueError) as e:
            raise ImageLoadError(f"{label}: cannot read the data ({e})") from None
    if not data:
        raise ImageLoadError(f"{label}: empty file (0 bytes)")
    if not isinstance(data, bytes):
        raise ImageLoadError(f"{label}: expected binary data, got {type(data).__name__}")
    return io.BytesIO(data)


def _accepted_list() -> str:
    """``JPEG, PNG, WebP, BMP, GIF or TIFF``."""
    *first, last = ACCEPTED_FORMATS.values()
    return f"{', '.join(first)} or {last}"


def _unidentified(fp: BinaryIO, label: str) -> ImageLoadError:
    """Why Pillow could not open ``fp``: a refused format (named), a broken header, or no image."""
    try:
        fp.seek(0)
        prefix = fp.read(16)
    except (OSError, ValueError):
        prefix = b""
    fmt = sniff_format(prefix)
    if fmt in ACCEPTED_FORMATS:
        return ImageLoadError(f"{label}: corrupt {ACCEPTED_FORMATS[fmt]} file (unreadable header)")
    if fmt is not None:
        return ImageLoadError(
            f"{label}: looks like {fmt}, which is not accepted; use {_accepted_list()}"
        )
    return ImageLoadError(f"{label}: not an image; use {_accepted_list()}")


def _check_geometry(width: int, height: int, label: str, max_pixels: int, model: bool) -> None:
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{label}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: refused, image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,} (possible decompression bomb)"
        )
    if not model:
        return
    if min(width, height) < MIN_SIDE:
        raise ImageLoadError(
            f"{label}: image is only {width}x{height} px; captioning needs at least "
            f"{MIN_SIDE} px on each side"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        ratio = max(width, height) / min(width, height)
        raise ImageLoadError(
            f"{label}: image is {width}x{height} px, an aspect ratio of {ratio:.0f}:1; captioning "
            f"needs at most {MAX_ASPECT}:1 (crop it first)"
        )


def _decode(img: Image.Image, label: str, max_pixels: int, reduce_to: int | None) -> Image.Image:
    """Check the header size, decode the first frame (reduced), orient it, convert it to RGB."""
    width, height = img.size
    _check_geometry(width, height, label, max_pixels, model=reduce_to is not None)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        orientation = _orientation(img)
        if reduce_to and (factor := _reduction(img.size, reduce_to, DRAFT_SCALE)) >= 2:
            img.draft("RGB", (width // factor, height // factor))  # JPEG: DCT scaling 1/2..1/8
        img.load()
        out = _to_8bit(img)
        if reduce_to and (factor := _reduction(out.size, reduce_to, REDUCE_SCALE)) >= 2:
            out = out.reduce(factor)  # box filter in uint8
        if orientation in _TRANSPOSE:
            out = out.transpose(_TRANSPOSE[orientation])
        out = out.convert("RGB") if out.mode != "RGB" else out
        return out.copy() if out is img else out
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb_error(label, e, max_pixels) from None
    except Exception as e:  # untrusted input: any decoder failure means a bad image
        raise _decode_error(label, e) from e


def _reduction(size: tuple[int, int], reduce_to: int, scale: int) -> int:
    """The integer factor to shrink ``size`` by: both sides stay >= ``reduce_to`` and about
    ``(scale * reduce_to)^2`` pixels remain (images under 4x that are left alone)."""
    width, height = size
    by_side = min(width, height) // reduce_to
    by_area = math.isqrt(width * height // (scale * reduce_to) ** 2)
    return max(1, min(by_side, by_area))


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of the current frame; 1 when absent or unreadable."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the photo unusable
        return 1


def _bomb_error(label: str, err: Exception, max_pixels: int) -> ImageLoadError:
    """Pillow refused the header size: say how large, in the words of ``_check_geometry``."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found[1]):,} pixels" if found else "too large"
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    return ImageLoadError(
        f"{label}: refused, image is {size}, over the limit of {limit:,} "
        "(possible decompression bomb)"
    )


def _decode_error(label: str, err: Exception) -> ImageLoadError:
    text = str(err) or type(err).__name__
    if "truncated" in text.lower():
        return ImageLoadError(f"{label}: image data is truncated (incomplete file)")
    return ImageLoadError(f"{label}: corrupt or unreadable image ({text})")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode as L, RGB or CMYK in uint8, transparency composited on white.

    Conversions run in C or in row chunks, so no full-size float copy is ever made.
    """
    mode = img.mode
    if mode in ("L", "RGB", "CMYK") and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba)
        return white
    if mode in _UINT16_MODES or mode in ("I", "F"):
        return _scale_to_gray(img)
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")


def _scale_to_gray(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float gray to uint8 L, in row chunks.

    16-bit values are divided by 257; integer and float images are scaled by their peak when it
    exceeds 255, float images in [0, 1] by 255; NaN and infinities become 0.
    """
    values = np.asarray(img)  # [H, W] uint16, int32 or float32
    rows = max(1, _CHUNK_PIXELS // max(1, values.shape[1]))

    def chunks():
        for r in range(0, values.shape[0], rows):
            c = values[r : r + rows].astype(np.float64)
            yield r, np.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0)

    scale = 1.0 / 257.0
    if img.mode not in _UINT16_MODES:
        peak = max((float(c.max()) for _, c in chunks() if c.size), default=0.0)
        scale = 255.0 / peak if peak > 255.0 else 1.0
        if img.mode == "F" and peak <= 1.0:
            scale = 255.0  # float images in [0, 1]
    gray = np.empty(values.shape, dtype=np.uint8)
    for r, c in chunks():
        gray[r : r + len(c)] = np.clip(np.rint(c * scale), 0, 255)
    return Image.fromarray(gray)
