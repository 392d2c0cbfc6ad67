"""Hostile and awkward image files made in the test, for the loader, the uploader and the browser.

``hostile_uploads()`` gives ``(name, bytes, expect)``: ``expect`` is ``"caption"`` when the file
must be captioned, else a fragment of the readable message it must produce.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image
from skimage import data as skdata

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 40 30
%%EndComments
newpath 0 0 moveto 40 0 lineto 40 30 lineto closepath fill
showpage
%%EOF
"""


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photo(name: str = "chelsea", size: tuple[int, int] | None = None) -> Image.Image:
    """An skimage photo as RGB, optionally resized."""
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    return img.resize(size, Image.Resampling.BICUBIC) if size else img


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but holds almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def png_bomb(width: int = 12_000, height: int = 10_000) -> bytes:
    """A real, complete grayscale PNG of ``width`` x ``height`` black pixels, a few hundred KB:
    decoding it would take ``width * height`` bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 500) for _ in range(height // 500)]
    parts.append(comp.compress(row * (height % 500)) + comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def cmyk_jpeg() -> bytes:
    return encode(photo("coffee").convert("CMYK"), "JPEG", quality=90)


def gray16_png() -> bytes:
    """A 16-bit grayscale PNG (mode I;16) of a photo."""
    gray = np.asarray(photo("astronaut").convert("L"), dtype=np.uint16) * 257
    img = Image.fromarray(gray)
    assert img.mode == "I;16"
    return encode(img, "PNG")


def palette_alpha_png() -> bytes:
    """A palette PNG whose palette entry 0 is transparent (tRNS)."""
    img = photo("rocket").quantize(64)
    return encode(img, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [photo("chelsea"), photo("coffee", (451, 300))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo("chelsea"), "JPEG", quality=90, exif=exif)


def solid_png(width: int, height: int) -> bytes:
    return encode(Image.new("RGB", (width, height), (120, 160, 90)), "PNG")


def hostile_uploads() -> list[tuple[str, bytes, str]]:
    """Every awkward upload the image loader must handle, with what it must produce."""
    jpeg = encode(photo("chelsea"), "JPEG", quality=90)
    return [
        ("empty.jpg", b"", "empty file"),
        ("truncated.jpg", jpeg[: len(jpeg) // 3], "truncated"),
        ("notes.jpg", b"just a text file, renamed to .jpg\n" * 20, "not an image"),
        ("bomb.png", png_bomb(), "decompression bomb"),
        ("drawing.jpg", EPS, "looks like EPS"),
        ("cmyk.jpg", cmyk_jpeg(), "caption"),
        ("gray16.png", gray16_png(), "caption"),
        ("palette-alpha.png", palette_alpha_png(), "caption"),
        ("animated.gif", animated_gif(), "caption"),
        ("rotated.jpg", exif_rotated_jpeg(), "caption"),
        ("dot.png", solid_png(1, 1), "only 1x1 px"),
        ("strip.png", solid_png(1, 5000), "only 1x5000 px"),
    ]
