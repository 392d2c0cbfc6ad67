"""The bundles shipped in artifacts/models: they caption real photos and reproduce their scores."""

from __future__ import annotations

import pytest
import skimage.data
from PIL import Image

from captioning.bundle import MODELS_DIR, Captioner, list_bundles
from captioning.data import load_flickr8k
from captioning.evaluate import evaluate

SHIPPED = [b.name for b in list_bundles(MODELS_DIR)]
pytestmark = pytest.mark.skipif(not SHIPPED, reason=f"no bundles in {MODELS_DIR}")


@pytest.fixture(scope="module", params=SHIPPED)
def captioner(request):
    return Captioner.load(MODELS_DIR / request.param, precision="fp32")


def test_expected_bundles_are_shipped():
    for name in ("resnet50-inject", "resnet50-attention", "vgg16-inject", "vgg16-attention"):
        assert name in SHIPPED


@pytest.mark.parametrize("photo", ["astronaut", "chelsea"])
def test_captions_real_photos_deterministically(captioner, photo):
    img = Image.fromarray(getattr(skimage.data, photo)())
    first = captioner.caption(img)
    assert first.text and first.tokens
    assert all(w in captioner.vocab.stoi and w not in ("<unk>", "<pad>") for w in first.tokens)
    assert captioner.caption(img).text == first.text


def test_bundle_size_budget(captioner):
    assert (captioner.path / "decoder.safetensors").stat().st_size < 25 * 2**20


def test_reevaluation_reproduces_recorded_dev_subset(captioner, flickr8k_dir):
    recorded = captioner.path / "metrics.json"
    subset = __import__("json").loads(recorded.read_text()).get("dev_first50")
    if not subset:
        pytest.skip(f"{captioner.name} has no recorded dev_first50 figures")
    (key, want), *_ = subset.items()
    assert want["precision"] == "fp32"
    ds = load_flickr8k(flickr8k_dir)
    ev = evaluate(
        captioner,
        ds,
        "dev",
        want["beam"],
        limit=50,
        meteor=False,
        length_alpha=want["length_alpha"],
    )
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rougeL"):
        assert ev.metrics[k] == pytest.approx(want[k], abs=1e-3), k
