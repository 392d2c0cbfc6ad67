"""The precision report: bf16 + channels_last stays close to the fp32 reference."""

from __future__ import annotations

import skimage.data
from PIL import Image

from captioning.bench import precision_report


def test_bf16_features_stay_close_to_fp32():
    imgs = [Image.fromarray(getattr(skimage.data, n)()) for n in ("chelsea", "coffee")]
    rep = precision_report("resnet50", imgs, batch=2)
    assert rep["images"] == 2 and rep["fp32_images_per_s"] > 0 and rep["bf16_images_per_s"] > 0
    assert rep["grid_cosine_min"] > 0.97
    assert 0 < rep["grid_rel_error_mean"] < 0.25
