"""load_image: accepted formats only, every pixel mode to RGB, orientation, animation, early
reduction of large images (bounded memory), and every kind of bad input."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile
from skimage import data as skdata

from captioning.data.images import (
    ACCEPTED_FORMATS,
    IMAGE_EXTENSIONS,
    MAX_ASPECT,
    MIN_SIDE,
    ImageLoadError,
    iter_image_files,
    load_image,
    sniff_format,
)
from captioning.models.encoders import INPUT_SIZE, preprocess
from tests import hostile
from tests.hostile import encode, png_header

REPO = Path(__file__).resolve().parents[1]
RSS_BUDGET_MB = 250  # an 8000x6000 PNG adds at most this much peak RSS


def save(tmp_path: Path, name: str, img: Image.Image, **kwargs) -> Path:
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


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
        load_image(b"just some words, nothing to see")


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
    with pytest.raises(ImageLoadError, match="bomb.png: refused, image is 10,000,000,000 pixels"):
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
    with pytest.raises(ImageLoadError, match="zero size|corrupt PNG"):
        load_image(png_header(0, 10))
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_unusable_bytes_are_caught_as_value_errors():
    """Callers that catch ValueError (the CLI, the server) see a bad upload, not a crash."""
    for junk in (b"", b"not an image at all", b"\xff\xd8\xff truncated jpeg"):
        with pytest.raises(ValueError, match=r"\w"):
            load_image(junk)


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


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", list(ACCEPTED_FORMATS))
def test_every_accepted_format_decodes(fmt):
    src = hostile.photo("coffee", (120, 80))
    img = load_image(encode(src, fmt), reduce_to=INPUT_SIZE)
    assert img.size == (120, 80)
    tolerance = 40 if fmt == "GIF" else 12  # GIF: a 256-colour palette
    assert np.abs(pixels(img).astype(int) - np.asarray(src)).mean() < tolerance


def _pillow_file(fmt: str) -> bytes:
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    modes = {"MSP": "1", "XBM": "1"}
    return encode(img.convert(modes.get(fmt, "RGB")), fmt)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (hostile.EPS, "EPS"),
        (b"8BPS\x00\x01" + bytes(20), "PSD"),
        (b"SIMPLE  =                    T" + b" " * 2850, "FITS"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
        *[(_pillow_file(f), f) for f in ("PPM", "ICO", "PCX", "SGI", "QOI", "DDS", "MSP", "XBM")],
    ],
)
def test_other_formats_are_refused_by_name_without_decoding(data, named, monkeypatch):
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    with pytest.raises(ImageLoadError) as err:
        load_image(data, name="photo.jpg")  # the name's extension does not matter
    assert str(err.value).startswith(f"photo.jpg: looks like {named}, which is not accepted")
    assert "JPEG, PNG, WebP, BMP, GIF or TIFF" in str(err.value)
    assert opened == []  # Pillow's EPS parser (and so Ghostscript) never ran


def test_sniff_format_reads_only_signatures():
    assert sniff_format(hostile.EPS[:16]) == "EPS"
    assert sniff_format(b"\x89PNG\r\n\x1a\n") == "PNG"
    assert sniff_format(b"just some text") is None
    assert sniff_format(b"") is None


def test_broken_header_of_an_accepted_format():
    with pytest.raises(ImageLoadError, match="corrupt PNG file"):
        load_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


# ---------------------------------------------------------------- early reduction


def test_reduce_to_leaves_images_up_to_twice_the_size_bit_for_bit():
    for size in ((224, 224), (500, 375), (447, 900)):
        for fmt in ("JPEG", "PNG"):
            data = encode(hostile.photo("rocket", size), fmt)
            full, fast = load_image(data), load_image(data, reduce_to=INPUT_SIZE)
            assert fast.size == size
            assert np.array_equal(pixels(full), pixels(fast))
            assert preprocess(full).equal(preprocess(fast))


def test_reduce_to_is_exact_on_flickr8k(flickr8k_dir):
    images = [p for d in ("Images", "Flicker8k_Dataset") for p in (flickr8k_dir / d).glob("*.jpg")]
    assert images
    for path in sorted(images)[:20]:  # the feature cache (PREPROCESS = "resize224") stays valid
        assert preprocess(load_image(path)).equal(preprocess(load_image(path, reduce_to=224)))


def test_large_jpeg_is_decoded_with_dct_scaling():
    data = encode(hostile.photo("coffee", (4000, 3000)), "JPEG", quality=92)
    img = load_image(data, reduce_to=INPUT_SIZE)
    assert img.size == (1000, 750)  # libjpeg scaled the decode by 1/4; no full-size pixels
    full = preprocess(load_image(data))
    diff = (preprocess(img) - full).abs()
    assert diff.mean() < 0.002 and diff.max() < 0.05


@pytest.mark.slow
def test_large_png_is_reduced_in_uint8_and_stays_close():
    data = encode(hostile.photo("rocket", (4800, 3200)), "PNG", compress_level=1)
    img = load_image(data, reduce_to=INPUT_SIZE)
    assert min(img.size) >= INPUT_SIZE and img.width * img.height <= 4 * (4 * INPUT_SIZE) ** 2
    assert img.size != (4800, 3200)
    full = preprocess(load_image(data))
    diff = (preprocess(img) - full).abs()
    assert diff.mean() < 0.002 and diff.max() < 0.05


@pytest.mark.parametrize(
    ("src", "check"),
    [
        (Image.new("CMYK", (2400, 1800), (0, 255, 255, 0)), lambda px: px[0, 0, 0] > 230),
        (Image.fromarray(np.full((1800, 2400), 257 * 100, np.uint16)),
         lambda px: abs(int(px[0, 0, 0]) - 100) <= 1),
        (Image.new("LA", (2400, 1800), (0, 0)), lambda px: px.min() == 255),
    ],
    ids=["cmyk", "gray16", "transparent"],
)  # fmt: skip
def test_large_images_of_every_mode_are_reduced(src, check, tmp_path):
    path = save(tmp_path, "big.tif" if src.mode == "CMYK" else "big.png", src)
    img = load_image(path, reduce_to=INPUT_SIZE)
    assert img.mode == "RGB" and min(img.size) >= INPUT_SIZE and img.size != (2400, 1800)
    assert check(pixels(img))


def test_reduction_keeps_orientation_and_first_frame(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path, "r.jpg", hostile.photo("coffee", (4000, 3000)), exif=exif)
    assert load_image(path, reduce_to=INPUT_SIZE).size == (750, 1000)
    red, blue = Image.new("RGB", (3000, 2000), (255, 0, 0)), Image.new("RGB", (3000, 2000), "blue")
    gif = save(tmp_path, "a.gif", red, save_all=True, append_images=[blue])
    img = load_image(gif, reduce_to=INPUT_SIZE)
    assert img.size != (3000, 2000) and pixels(img)[5, 5].tolist() == [255, 0, 0]


def test_hostile_files_end_in_an_image_or_a_readable_error():
    for name, data, expect in hostile.hostile_uploads():
        try:
            img = load_image(data, name=name, reduce_to=INPUT_SIZE)
        except ImageLoadError as e:
            assert expect != "caption", (name, str(e))
            assert str(e).startswith(f"{name}: ") and expect in str(e), str(e)
            assert "\n" not in str(e)
        else:
            assert expect == "caption", name
            assert img.mode == "RGB" and min(img.size) >= MIN_SIDE


def test_exif_rotation_of_the_hostile_photo():
    assert load_image(hostile.exif_rotated_jpeg()).size == (300, 451)


# ---------------------------------------------------------------- geometry a model can use


@pytest.mark.parametrize(
    ("size", "why"),
    [((1, 1), "only 1x1 px"), ((1, 5000), "only 1x5000 px"), ((5000, 15), "only 5000x15 px"),
     ((MIN_SIDE, MIN_SIDE * MAX_ASPECT + 1), "16x321 px, an aspect ratio of 20:1; captioning")],
)  # fmt: skip
def test_images_no_model_can_read_are_refused(size, why):
    data = hostile.solid_png(*size)
    with pytest.raises(ImageLoadError, match=f"^x.png: image is {why}"):
        load_image(data, name="x.png", reduce_to=INPUT_SIZE)
    assert load_image(data).size == size  # the plain loader still decodes them


def test_smallest_and_most_elongated_accepted_images():
    for size in ((MIN_SIDE, MIN_SIDE), (MIN_SIDE, MIN_SIDE * MAX_ASPECT)):
        assert load_image(hostile.solid_png(*size), reduce_to=INPUT_SIZE).size == size


def test_real_decompression_bomb_is_refused_before_decoding():
    data = hostile.png_bomb()  # 12000x10000 pixels in ~120 KB
    assert len(data) < 300_000
    with pytest.raises(ImageLoadError, match=r"bomb.png: refused.*120,000,000 pixels.*bomb\)$"):
        load_image(data, name="bomb.png", reduce_to=INPUT_SIZE)


# ---------------------------------------------------------------- bounded memory

RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from captioning.data.images import load_image
    from captioning.models.encoders import INPUT_SIZE, preprocess
    x = preprocess(load_image(sys.argv[1], reduce_to=INPUT_SIZE))
    assert x.shape == (3, INPUT_SIZE, INPUT_SIZE)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def peak_rss_mb(image: Path) -> float:
    """Peak RSS of a fresh process that loads and preprocesses ``image`` (MB)."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(image)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return int(out.stdout.split()[-1]) / 1024  # ru_maxrss is in KB on Linux


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KB on Linux only")
def test_huge_png_adds_little_peak_memory(tmp_path):
    big = Image.new("RGB", (8000, 6000), (90, 140, 200))
    big.paste((60, 130, 60), (0, 4000, 8000, 6000))
    big.save(tmp_path / "big.png")  # 152 KB
    del big
    assert (tmp_path / "big.png").stat().st_size < 400_000
    small = tmp_path / "small.jpg"
    small.write_bytes(encode(hostile.photo("chelsea"), "JPEG"))
    added = peak_rss_mb(tmp_path / "big.png") - peak_rss_mb(small)
    # decoding to uint8 (144 MB) is the floor; a float32 copy at full size would add 576 MB more
    assert added < RSS_BUDGET_MB, f"the 8000x6000 PNG added {added:.0f} MB of peak RSS"
