"""The pipelined batch path: ordered batches, errors in place, bounded read-ahead, cancellation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.data.images import ImageLoadError
from captioning.models.encoders import preprocess
from captioning.runtime.pixels import Batch, load_pixels, load_rgb, prefetch

SAMPLES = Path(__file__).resolve().parents[1] / "artifacts" / "samples"
BUNDLE = Path(__file__).resolve().parents[1] / "artifacts" / "models" / "resnet50-inject"


class Loader:
    """Counts the loads started; items in ``bad`` fail like an unreadable image."""

    def __init__(self, bad=(), delay: float = 0.0) -> None:
        self.bad, self.delay = set(bad), delay
        self.started = 0
        self.lock = threading.Lock()

    def __call__(self, item: int) -> torch.Tensor:
        with self.lock:
            self.started += 1
        if self.delay:
            time.sleep(self.delay)
        if item in self.bad:
            raise ImageLoadError(f"item {item}: corrupt")
        return torch.full((3, 2, 2), float(item))


def test_batches_keep_order_and_report_errors_in_place():
    load = Loader(bad={3, 7})
    batches = list(prefetch(range(10), 4, workers=3, load=load))
    assert [b.sources for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [sorted(b.errors) for b in batches] == [[3], [3], []]
    assert "item 7" in str(batches[1].errors[3])
    assert batches[0].loaded == [0, 1, 2] and batches[2].loaded == [8, 9]
    for b in batches:
        assert b.pixels.shape == (len(b.loaded), 3, 2, 2)
        assert [int(p[0, 0, 0]) for p in b.pixels] == b.loaded  # pixels in source order


def test_a_batch_of_failures_has_no_pixels():
    (batch,) = prefetch([1, 2], 2, load=Loader(bad={1, 2}))
    assert isinstance(batch, Batch) and batch.pixels is None and batch.loaded == []


def test_read_ahead_is_bounded():
    load = Loader(delay=0.002)
    seen = []
    for k, batch in enumerate(prefetch(range(40), 4, workers=2, ahead=2, load=load)):
        time.sleep(0.02)  # a slow consumer: the loaders could run far ahead if unbounded
        seen.append(load.started)
        assert load.started <= (k + 1 + 2) * 4, (k, load.started)
        assert len(batch) == 4
    assert load.started == 40 and max(seen) <= 40


def test_closing_early_cancels_pending_loads():
    load = Loader(delay=0.01)
    stream = prefetch(range(200), 2, workers=2, ahead=1, load=load)
    next(stream)
    stream.close()
    time.sleep(0.1)
    assert load.started <= 8  # the first batches, not 200


def test_other_errors_propagate():
    def boom(item):
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        list(prefetch([1], 1, load=boom))
    with pytest.raises(ValueError):
        list(prefetch([1], 0))


def test_load_pixels_on_a_real_photo_and_junk():
    x = load_pixels(SAMPLES / "chelsea.jpg")
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    same = load_pixels((SAMPLES / "chelsea.jpg").read_bytes())
    assert torch.equal(x, same)  # bytes and paths decode alike
    with pytest.raises(ImageLoadError):
        load_pixels(b"not an image")


@pytest.mark.parametrize("size", [(224, 224), (640, 427), (1999, 301)])
def test_load_rgb_is_the_uint8_half_of_load_pixels(tmp_path, size):
    """What batch workers ship between processes finishes into exactly load_pixels' tensor."""
    photo = tmp_path / "photo.jpg"
    Image.open(SAMPLES / "coffee.jpg").convert("RGB").resize(size).save(photo, quality=90)
    rgb = load_rgb(photo)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert min(rgb.shape[:2]) >= 224 and rgb.size <= 4 * 4 * 3 * 224 * 224  # reduced, not resized
    shipped = np.frombuffer(rgb.tobytes(), np.uint8).reshape(rgb.shape)  # read-only, as in Ray
    assert torch.equal(preprocess(shipped), load_pixels(photo))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(rgb.astype(np.float32))


@pytest.mark.skipif(not BUNDLE.is_dir(), reason="needs the shipped resnet50-inject bundle")
def test_caption_stream_matches_caption_and_keeps_bad_files_in_place(tmp_path):
    """Overlapped (batch i+1 encodes while batch i is beam-searched) or not, the stream gives
    ``caption``'s captions in input order, with each bad file's error in its place, including a
    batch in which no image loads."""
    from captioning.inference.captioner import Captioner

    cap = Captioner.load(BUNDLE, precision="fp32", runtime="torch")
    bad = [tmp_path / f"broken{i}.jpg" for i in range(3)]
    for b in bad:
        b.write_bytes(b"\xff\xd8\xff not really a jpeg")
    files = [SAMPLES / "chelsea.jpg", bad[0], SAMPLES / "coffee.jpg", SAMPLES / "rocket.jpg"]
    files += [bad[1], bad[2], SAMPLES / "astronaut.jpg"]
    want = {f: cap.caption(f, beam_size=2) for f in files if f not in bad}
    runs = {}
    for overlap in (True, False):
        out = runs[overlap] = list(cap.caption_stream(files, 2, batch_size=2, overlap=overlap))
        assert [src for src, _ in out] == files
        for src, res in out:
            if src in bad:
                assert isinstance(res, ImageLoadError) and src.name in str(res)
            else:
                assert res.text == want[src].text
                assert res.timings["encode_ms"] > 0 and res.timings["decode_ms"] > 0
    for (_, a), (_, b) in zip(runs[True], runs[False], strict=True):  # the same batches
        assert type(a) is type(b) and (isinstance(a, ImageLoadError) or a.nbest == b.nbest)
