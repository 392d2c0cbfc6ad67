"""The shipped encoders carry real ImageNet weights, and each yields a pooled vector and a grid."""

from __future__ import annotations

import pytest
import skimage.data
import torch
from PIL import Image

from captioning.core.machine import Precision, resolve_precision
from captioning.models.encoders import (
    ENCODERS,
    Encoder,
    InputNorm,
    build_encoder,
    get_spec,
    preprocess,
    weights_path,
    weights_sha256,
)
from captioning.models.imagenet import imagenet_labels

SHIPPED = [n for n, s in ENCODERS.items() if s.source == "converted"]


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


@pytest.fixture(scope="module")
def resnet() -> object:
    return build_encoder("resnet50", "fp32")


@pytest.fixture(scope="module")
def vgg() -> object:
    return build_encoder("vgg16", "fp32")


def top(enc, image: Image.Image, k: int = 3) -> list[tuple[str, float]]:
    probs = enc.classify(preprocess(image, "classify")[None])[0]
    values, idx = probs.topk(k)
    labels = imagenet_labels()
    return [(labels[i], float(v)) for v, i in zip(values, idx, strict=True)]


def test_shipped_weights_exist_and_hash():
    for name in SHIPPED:
        path = weights_path(get_spec(name))
        assert path.is_file(), f"{path} must ship with the repo"
        assert len(weights_sha256(name)) == 64


def test_resnet50_classifies_chelsea_as_egyptian_cat(resnet):
    result = top(resnet, photo("chelsea"))
    assert [lb for lb, _ in result] == ["Egyptian cat", "tiger cat", "tabby"]
    assert result[0][1] == pytest.approx(0.78, abs=0.04)


def test_resnet50_classifies_coffee_as_espresso(resnet):
    label, prob = top(resnet, photo("coffee"))[0]
    assert label == "espresso" and prob > 0.97


def test_resnet50_bf16_fast_path_keeps_the_labels():
    enc = build_encoder("resnet50", Precision("bf16", channels_last=True))
    result = top(enc, photo("chelsea"))
    assert result[0][0] == "Egyptian cat" and result[0][1] == pytest.approx(0.78, abs=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_outputs_pooled_and_grid(name):
    enc = build_encoder(name, "fp32")
    spec = enc.spec
    out = enc.encode(torch.stack([preprocess(photo("astronaut")), preprocess(photo("rocket"))]))
    assert out.pooled.shape == (2, spec.pooled_dim)
    assert out.grid.shape == (2, spec.grid_cells, spec.grid_channels)
    assert out.grid.dtype == torch.float32
    torch.testing.assert_close(out.pooled, out.grid.mean(1))


@pytest.mark.slow
def test_vgg16_conv_features_separate_cat_and_coffee(vgg):
    x = torch.stack([preprocess(photo("chelsea")), preprocess(photo("coffee"))])
    grid = vgg.encode(x).grid  # [2, 196, 512]
    cos = torch.cosine_similarity(grid[0].flatten(), grid[1].flatten(), dim=0)
    assert cos < 0.2, "real conv5_3 features of a cat and a coffee cup should be far apart"
    random = Encoder(get_spec("vgg16")).eval()
    with torch.no_grad():
        g = random(x).grid
    rand_cos = torch.cosine_similarity(g[0].flatten(), g[1].flatten(), dim=0)
    assert rand_cos > 0.6, "random weights make every image look alike"


def test_preprocess_modes():
    img = photo("chelsea")  # 451x300
    assert preprocess(img).shape == (3, 224, 224)
    assert preprocess(img, "classify").shape == (3, 224, 224)
    x = preprocess(img)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    with pytest.raises(ValueError, match="mode"):
        preprocess(img, "nope")


def test_caffe_norm_is_bgr_minus_mean():
    x = torch.rand(1, 3, 4, 4)
    y = InputNorm("caffe")(x)
    mean_bgr = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    torch.testing.assert_close(y, x.flip(1) * 255 - mean_bgr)


def test_unknown_encoder_and_precision():
    with pytest.raises(KeyError, match="unknown encoder"):
        get_spec("alexnet")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8")


def test_missing_weights_give_a_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert-weights"):
        build_encoder("resnet50", "fp32", encoder_dir=tmp_path)


def test_torchvision_variants_are_separate_and_fail_clearly_offline(monkeypatch, tmp_path):
    assert ENCODERS["resnet50-tv"].norm == "imagenet" and ENCODERS["resnet50"].norm == "caffe"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded"):
        build_encoder("resnet50-tv", "fp32")
