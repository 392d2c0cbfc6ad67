"""int8 on OpenVINO: encoders quantised with NNCF on a recorded calibration set, decoder steps
with int8 weights.

Encoder (``quantize_encoder``): NNCF post-training quantisation (8-bit weights and activations,
fast bias correction) of the traced fp32 graph, a fine-tuned block together with its trunk. The
activation ranges come from a calibration set (``CalibrationSet``):

- ``flickr8k-train``: the 300 Flickr8k *train* photos named in
  ``artifacts/calibration/flickr8k-train.txt`` (every 20th of the sorted train split; never a dev
  or test photo), read from ``$CAPTIONING_DATA``. This is the set the quality gate measures.
- ``samples``, when those photos are not on this machine: 300 pictures made from the shipped
  sample photos (``artifacts/samples``) by a seeded recipe (``SYNTHETIC_RECIPE``: random crops of
  35-100% of each side, horizontal flips, brightness x0.6-1.4, colour x0.5-1.5). Its features
  are further from fp32 (cosine 0.989 mean against 0.993 for train photos, ResNet50), so it is
  a different precision in every record: ``int8-samples``.

Decoder step (``compress_step``): ``nncf.compress_weights`` stores the LSTM's, attention's and
output layer's weights as int8 (asymmetric, per output channel); activations stay f32. The step
reads a quarter of the bytes, which is what bounds it.

A quantised model is cached like any compiled one (``captioning.runtime.openvino``), keyed by
the weights' sha256 (a tuned block's included), the calibration set's digest and NNCF's version.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from captioning.core.paths import ARTIFACTS_DIR, SAMPLES_DIR
from captioning.core.settings import DATA_ENV, setting

CALIBRATION_LIST = ARTIFACTS_DIR / "calibration" / "flickr8k-train.txt"
TRAIN_SET = "flickr8k-train"
SAMPLES_SET = "samples"
SYNTHETIC_SIZE = 300
SYNTHETIC_SEED = 0
SYNTHETIC_RECIPE = "crop 0.35-1.0, flip 0.5, brightness 0.6-1.4, colour 0.5-1.5"


def nncf_version() -> str | None:
    try:
        return importlib.metadata.version("nncf")
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF's tables and progress go to stderr (stdout carries captions), its warnings off."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        logging.getLogger("nncf").setLevel(logging.ERROR)
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA"
        yield


def _nncf():
    with _quiet_nncf():
        import nncf
    return nncf


# ---------------------------------------------------------------- calibration sets


@dataclass(frozen=True)
class CalibrationSet:
    """The photos an int8 encoder is calibrated on; ``key`` names it in caches and records."""

    name: str  # TRAIN_SET | SAMPLES_SET
    digest: str  # sha256 of what defines the set (the names list, or the samples and recipe)
    data: str | None = None  # where to look for the train photos (default ``$CAPTIONING_DATA``)

    @property
    def key(self) -> str:
        return f"{self.name}-{self.digest[:12]}"

    @property
    def precision_tag(self) -> str:
        """What ``Precision.calibration`` records: "" for the train set, else the set's name."""
        return "" if self.name == TRAIN_SET else self.name

    def sources(self) -> tuple[Path, ...]:
        """The photos, or () when they are not all on this machine."""
        if self.name == SAMPLES_SET:
            return tuple(sorted(SAMPLES_DIR.glob("*.jpg")))
        root = self.data or setting(DATA_ENV)
        if not root:
            return ()
        from captioning.data import load_dataset

        try:
            ds = load_dataset(root, check_images=False)
        except Exception:  # noqa: BLE001 - no readable data set means "not available"
            return ()
        paths = tuple(ds.image_path(n) for n in _train_names())
        return paths if all(p.is_file() for p in paths) else ()

    def size(self) -> int:
        return SYNTHETIC_SIZE if self.name == SAMPLES_SET else len(_train_names())

    def pixels(self) -> Iterator[torch.Tensor]:
        """Each calibration picture as the encoders' input [3, 224, 224] in [0, 1]."""
        from captioning.models.encoders import preprocess
        from captioning.runtime.pixels import load_pixels

        sources = self.sources()
        if not sources:
            raise FileNotFoundError(f"the {self.name} calibration photos are not on this machine")
        if self.name == TRAIN_SET:
            for path in sources:
                yield load_pixels(path)
            return
        photos = [Image.open(p).convert("RGB") for p in sources]
        rng = np.random.default_rng(SYNTHETIC_SEED)
        for i in range(SYNTHETIC_SIZE):
            yield preprocess(_synthetic(photos[i % len(photos)], rng))


def _synthetic(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One picture of ``SYNTHETIC_RECIPE`` from ``photo``."""
    w, h = photo.size
    scale = rng.uniform(0.35, 1.0)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    pic = photo.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        pic = pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pic = ImageEnhance.Brightness(pic).enhance(rng.uniform(0.6, 1.4))
    return ImageEnhance.Color(pic).enhance(rng.uniform(0.5, 1.5))


def _train_names() -> list[str]:
    return CALIBRATION_LIST.read_text().split()


def calibration_sets(data: str | Path | None = None) -> list[CalibrationSet]:
    """Every set, best first: the recorded train photos (looked for under ``data``, default
    ``$CAPTIONING_DATA``), then the samples' synthetic set. Cheap: no photo is opened."""
    train = hashlib.sha256("\n".join(_train_names()).encode()).hexdigest()
    h = hashlib.sha256(f"{SYNTHETIC_RECIPE} seed {SYNTHETIC_SEED} n {SYNTHETIC_SIZE}".encode())
    for f in sorted(SAMPLES_DIR.glob("*.jpg")):
        h.update(f.name.encode() + f"{f.stat().st_size}".encode())
    data = str(data) if data else None
    return [CalibrationSet(TRAIN_SET, train, data), CalibrationSet(SAMPLES_SET, h.hexdigest())]


# ---------------------------------------------------------------- transforms


def quantize_encoder(calibration: CalibrationSet):
    """A transform (``ov.Model`` -> ``ov.Model``) quantising an encoder graph on ``calibration``."""

    def run(model):
        nncf = _nncf()
        what = "Flickr8k train photos" if calibration.name == TRAIN_SET else "sample pictures"
        n = calibration.size()
        print(f"note: quantising to int8 on {n} {what} (once; it is cached)", file=sys.stderr)
        data = [x[None].numpy() for x in calibration.pixels()]  # each [1, 3, 224, 224]
        with _quiet_nncf():
            return nncf.quantize(model, nncf.Dataset(data), subset_size=len(data))

    return run


def compress_step(model):
    """A decoder step graph with int8 weights (per output channel); activations stay f32."""
    nncf = _nncf()
    with _quiet_nncf():
        return nncf.compress_weights(model)
