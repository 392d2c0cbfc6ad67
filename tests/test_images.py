"""load_image: every pixel mode to RGB, orientation, animation, and every kind of bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data as skdata

from captioning.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    iter_image_files,
    load_image,
)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def save(tmp_path: Path, name: str, img: Image.Image, **kwargs) -> Path:
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but holds almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def chelsea_jpeg() -> bytes:
    return encode(Image.fromarray(skdata.chelsea()), "JPEG", quality=90)


def test_real_photo_from_path_bytes_and_stream(tmp_path, chelsea_jpeg):
    path = tmp_path / "chelsea.jpg"
    path.write_bytes(chelsea_jpeg)
    for src in (path, str(path), chelsea_jpeg, io.BytesIO(chelsea_jpeg)):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (451, 300)
    original = skdata.chelsea().astype(int)
    assert np.abs(pixels(load_image(path)).astype(int) - original).mean() < 5


def test_rgb_png_is_exact(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    img = load_image(save(tmp_path, "x.png", Image.fromarray(array)))
    assert np.array_equal(pixels(img), array)


def test_pil_image_input_is_not_modified():
    src = Image.new("RGBA", (3, 2), (10, 20, 30, 0))
    img = load_image(src)
    assert src.mode == "RGBA" and img is not src
    assert pixels(img)[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP", "JPEG", "WEBP"])
def test_grayscale_l(tmp_path, fmt):
    img = load_image(save(tmp_path, f"g.{fmt.lower()}", Image.new("L", (4, 3), 200), format=fmt))
    assert img.size == (4, 3)
    assert np.abs(pixels(img).astype(int) - 200).max() <= 2


def test_la_composites_on_white(tmp_path):
    src = Image.new("LA", (2, 1), (0, 255))
    src.putpixel((1, 0), (0, 0))
    out = pixels(load_image(save(tmp_path, "la.png", src)))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_rgba_half_transparent_composites_on_white(tmp_path):
    src = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    src.putpixel((0, 0), (255, 0, 0, 255))
    out = pixels(load_image(save(tmp_path, "rgba.png", src)))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert np.abs(out[1, 1].astype(int) - 127).max() <= 1


@pytest.mark.parametrize("name", ["p.png", "p.gif"])
def test_palette_with_transparency_becomes_white(tmp_path, name):
    src = Image.new("P", (2, 1), 0)
    src.putpalette([0, 0, 255, 255, 0, 0] + [0] * (256 * 3 - 6))
    src.putpixel((1, 0), 1)
    out = pixels(load_image(save(tmp_path, name, src, transparency=0)))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]


def test_palette_without_transparency(tmp_path):
    src = Image.new("P", (2, 1), 1)
    src.putpalette([0, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 6))
    assert pixels(load_image(save(tmp_path, "p.bmp", src)))[0, 0].tolist() == [0, 128, 0]


@pytest.mark.parametrize("name", ["cmyk.jpg", "cmyk.tif"])
def test_cmyk(tmp_path, name):
    img = load_image(save(tmp_path, name, Image.new("CMYK", (3, 2), (0, 255, 255, 0))))
    assert img.size == (3, 2)
    r, g, b = pixels(img)[0, 0].astype(int)
    assert r > 230 and g < 25 and b < 25


@pytest.mark.parametrize(
    ("name", "mode"), [("a.png", "I;16"), ("a.tif", "I;16"), ("b.tif", "I;16B")]
)
def test_16bit_gray_scales_to_8bit(tmp_path, name, mode):
    values = np.array([[0, 65535, 257 * 100]], dtype=np.uint16)
    if mode == "I;16B":
        src = Image.frombytes(mode, (3, 1), values.astype(">u2").tobytes())
    else:
        src = Image.fromarray(values)
    path = save(tmp_path, name, src)
    assert Image.open(path).mode == mode
    out = pixels(load_image(path))
    assert out[0, :, 0].tolist() == [0, 255, 100]
    assert out.shape == (1, 3, 3)


def test_int32_mode_i_scales_by_max(tmp_path):
    src = Image.fromarray(np.array([[0, 1000, 500]], dtype=np.int32))
    path = save(tmp_path, "i.tif", src)
    assert Image.open(path).mode == "I"
    assert pixels(load_image(path))[0, :, 0].tolist() == [0, 255, 128]


def test_int32_mode_i_small_values_unchanged():
    src = Image.fromarray(np.array([[0, 7, 200]], dtype=np.int32))
    assert pixels(load_image(src))[0, :, 0].tolist() == [0, 7, 200]


def test_float_mode_f(tmp_path):
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    path = save(tmp_path, "f.tif", unit)
    assert Image.open(path).mode == "F"
    assert pixels(load_image(path))[0, :, 0].tolist() == [0, 128, 255]
    big = Image.fromarray(np.array([[0.0, 510.0, float("nan")]], dtype=np.float32))
    assert pixels(load_image(big))[0, :, 0].tolist() == [0, 255, 0]


def test_bilevel_mode_1(tmp_path):
    src = Image.new("1", (2, 1), 0)
    src.putpixel((1, 0), 1)
    out = pixels(load_image(save(tmp_path, "one.png", src)))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    src = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path, "rotated.jpg", src, exif=exif)
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)


def test_animated_gif_gives_first_frame(tmp_path):
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    path = save(tmp_path, "anim.gif", red, save_all=True, append_images=[blue], duration=50)
    assert Image.open(path).n_frames == 2
    assert pixels(load_image(path))[0, 0].tolist() == [255, 0, 0]
    opened = Image.open(path)
    opened.seek(1)
    assert pixels(load_image(opened))[0, 0].tolist() == [255, 0, 0]


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.jpg: file not found"):
        load_image(tmp_path / "nope.jpg")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_empty_file_bytes_and_stream(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png: empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageLoadError, match="^upload: empty file"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="^photo.jpg: empty file"):
        load_image(io.BytesIO(b""), name="photo.jpg")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageLoadError, match="notes.jpg: not an image"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="^upload: not an image"):
        load_image(b"%PDF-1.4 nothing to see")


def test_truncated_jpeg(tmp_path, chelsea_jpeg):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    path = tmp_path / "half.jpg"
    path.write_bytes(chelsea_jpeg[: len(chelsea_jpeg) // 2])
    with pytest.raises(ImageLoadError, match="half.jpg: image data is truncated"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(chelsea_jpeg[:1000])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(array), "PNG")
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(data[: len(data) // 2], name="cut.png")


def test_corrupt_bytes_after_valid_header(chelsea_jpeg):
    garbled = chelsea_jpeg[:600] + bytes(range(256)) * 40
    try:
        img = load_image(garbled)
    except ImageLoadError as e:
        assert str(e).startswith("upload:")
    else:  # libjpeg may decode garbage as (ugly) pixels; it must still be a valid RGB image
        assert img.mode == "RGB" and img.size == (451, 300)


def test_decompression_bomb_refused_from_header_before_decoding():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError, match="bomb.png: refused.*too large"):
        load_image(png_header(100_000, 100_000), name="bomb.png")  # beyond Pillow's own limit
    with pytest.raises(ImageLoadError, match=r"10000x6000 = 60,000,000 pixels.*50,000,000"):
        load_image(png_header(10_000, 6_000))  # under Pillow's limit, over ours
    with pytest.raises(ImageLoadError, match="refused"):
        # Pillow warns (not raises) for this size; the warning is turned into an error locally
        load_image(png_header(10_000, 10_000), max_pixels=10**12)
    assert before == Image.MAX_IMAGE_PIXELS


def test_max_pixels_on_a_real_small_file(tmp_path):
    path = save(tmp_path, "big.png", Image.new("RGB", (100, 50)))
    with pytest.raises(ImageLoadError, match="big.png: refused, image is 100x50"):
        load_image(path, max_pixels=4999)
    assert load_image(path, max_pixels=5000).size == (100, 50)


def test_zero_size_image_is_refused():
    with pytest.raises(ImageLoadError, match="zero size|not an image"):
        load_image(png_header(0, 10))
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_errors_are_value_errors():
    assert issubclass(ImageLoadError, ValueError)


def test_iter_image_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / ".hidden").mkdir()
    for rel in ["z.JPG", "a.png", "b/c.webp", "b/notes.txt", "b/.hidden/x.jpg", "b/._d.jpg"]:
        (tmp_path / rel).write_bytes(b"x")
    explicit = tmp_path / "notes.txt"
    found = iter_image_files([explicit, tmp_path, "missing.jpg"])
    assert found == [
        explicit,
        tmp_path / "a.png",
        tmp_path / "b" / "c.webp",
        tmp_path / "z.JPG",
        Path("missing.jpg"),
    ]
    assert isinstance(IMAGE_EXTENSIONS, tuple) and ".tiff" in IMAGE_EXTENSIONS
