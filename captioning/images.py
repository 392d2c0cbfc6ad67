"""Load any user-supplied image as a fully decoded RGB picture, or fail with ImageLoadError."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 50_000_000

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageLoadError(ValueError):
    """An image that cannot be used; the message names the source and says why."""


ImageSource = str | Path | bytes | BinaryIO | Image.Image


def load_image(
    src: ImageSource, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode ``src`` into a new RGB image.

    ``src`` is a path, raw bytes, a binary stream (e.g. an upload) or a PIL image. EXIF
    orientation is applied, animated images give their first frame, transparency is composited
    on white and 16-bit/float data is scaled to 8 bits. Images larger than ``max_pixels`` are
    refused from their header, before any pixels are decoded (Pillow's own decompression-bomb
    limit also applies). ``name`` labels the source in error messages (default: the path, or
    "upload" for bytes and streams). Every failure is an :class:`ImageLoadError`.
    """
    label = _label(src, name)
    if isinstance(src, Image.Image):
        return _decode(src, label, max_pixels)
    fp = _open_source(src, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                return _decode(img, label, max_pixels)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: not an image, or an unsupported image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{label}: refused, image is too large ({e})") from None
    except Exception as e:  # untrusted input: any decoder failure means a bad image
        raise _decode_error(label, e) from e
    finally:
        if isinstance(fp, io.BufferedReader):
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


def _decode(img: Image.Image, label: str, max_pixels: int) -> Image.Image:
    """Check the header size, decode the first frame, orient it and convert it to RGB."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{label}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: refused, image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,} (possible decompression bomb)"
        )
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        img.load()
        oriented = ImageOps.exif_transpose(img)
        return _to_rgb(oriented if oriented is not None else img.copy())
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{label}: refused, image is too large ({e})") from None
    except Exception as e:  # untrusted input: any decoder failure means a bad image
        raise _decode_error(label, e) from e


def _decode_error(label: str, err: Exception) -> ImageLoadError:
    text = str(err) or type(err).__name__
    if "truncated" in text.lower():
        return ImageLoadError(f"{label}: image data is truncated (incomplete file)")
    return ImageLoadError(f"{label}: corrupt or unreadable image ({text})")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparent areas become white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _UINT16_MODES:
        values = np.asarray(img).astype(np.float64) / 257.0
        return _gray_to_rgb(values)
    if mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(values.max()) if values.size else 0.0
        if peak > 255.0:
            values = values * (255.0 / peak)
        elif mode == "F" and peak <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        return _gray_to_rgb(values)
    return img.convert("RGB")


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
