"""The bundles shipped in artifacts/models: they caption real photos, their records say exactly
what made each number, and they reproduce their recorded scores."""

from __future__ import annotations

import json

import pytest
import skimage.data
from PIL import Image

from captioning import Captioner
from captioning.bundle.catalog import list_bundles
from captioning.bundle.format import is_ensemble
from captioning.bundle.records import METRICS_FORMAT
from captioning.bundle.reports import default_result, read_prediction_rows, results
from captioning.core.paths import MODELS_DIR
from captioning.data import load_flickr8k
from captioning.inference.captioner import EnsembleCaptioner
from captioning.inference.evaluate import evaluate
from captioning.models.decoding import DecodeConfig
from captioning.models.encoders import preprocess
from tests.scoring import word_logprobs

SHIPPED = {b.name: b for b in list_bundles(MODELS_DIR)}
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHIPPED, reason=f"no bundles in {MODELS_DIR}"),
]


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def captioner(request):
    return Captioner.load(MODELS_DIR / request.param, precision="fp32", runtime="torch")


def test_expected_bundles_are_shipped():
    for name in (
        "resnet50-inject",
        "resnet50-merge",
        "resnet50-attention",
        "vgg16-inject",
        "vgg16-attention",
    ):
        assert name in SHIPPED


@pytest.mark.parametrize("photo", ["astronaut", "chelsea"])
def test_caption_is_the_models_own_best_scored_sentence(captioner, photo):
    """The reported log-prob is what the decoder itself gives that caption (teacher forced)."""
    img = Image.fromarray(getattr(skimage.data, photo)())
    first = captioner.caption(img)
    assert first.text and first.tokens and captioner.caption(img).text == first.text
    best = captioner.caption_pixels(preprocess(img)[None])[0]
    assert best.text == first.text
    ids = captioner.vocab.encode(first.text, add_special=False)
    assert captioner.vocab.decode(ids) == first.text
    assert first.score == pytest.approx(float(word_logprobs(captioner, img, ids).sum()), abs=2e-3)


def test_bundle_size_budget(captioner):
    if isinstance(captioner, EnsembleCaptioner):  # names its members; holds no weights
        assert sum(f.stat().st_size for f in captioner.path.glob("*.json")) < 2**20
        return
    assert (captioner.path / "decoder.safetensors").stat().st_size < 25 * 2**20


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_records_say_what_made_each_number(name):
    b = SHIPPED[name]
    doc = json.loads((b.path / "metrics.json").read_text())
    assert doc["format"] == METRICS_FORMAT and doc["version"] == 2
    cfg = b.config
    assert cfg["precision"] not in ("auto", None) and cfg["runtime"] in ("torch", "openvino")
    if not is_ensemble(cfg):
        assert cfg["runtime"] == cfg["train_config"].get("runtime", "torch")  # of train features
    assert cfg["data"]["layout"] == "flickr8k-official" and cfg["data"]["images"]["test"] == 1000
    settings = [r.setting.to_dict() for r in results(b)]
    assert len(settings) == len({json.dumps(s, sort_keys=True) for s in settings}), "one per key"
    test = default_result(b, "test")
    assert test is not None and test.n_images == 1000
    assert test.setting.decoding == DecodeConfig(**cfg["decode_defaults"])
    assert sum(r.default for r in results(b) if r.setting.split == "test") == 1
    rows = read_prediction_rows(test.predictions)
    assert len(rows) == 1000 and {r["image"] for r in rows}
    card = (b.path / "card.md").read_text()
    assert "flickr8k-official layout (official Flickr8k split)" in card and "(default)" in card
    assert cfg["decode_chosen_by"] == "dev CIDEr-D"  # every shipped default was tuned on dev
    assert "(chosen on dev CIDEr-D by `tune-decoding`)" in card


def test_reevaluation_reproduces_recorded_dev_subset(captioner, flickr8k_dir):
    subset = [r for r in results(SHIPPED[captioner.name]) if r.setting.limit == 50]
    if not subset:
        pytest.skip(f"{captioner.name} has no recorded figures on the first 50 dev images")
    (want,) = subset
    assert want.setting.precision == "fp32" and want.setting.split == "dev"
    ds = load_flickr8k(flickr8k_dir)
    d = want.setting.decoding
    ev = evaluate(captioner, ds, "dev", d.beam_size, limit=50, meteor=False,
                  length_alpha=d.length_alpha, no_repeat_ngram=d.no_repeat_ngram)  # fmt: skip
    assert ev.setting == want.setting
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rougeL"):
        assert ev.metrics[k] == pytest.approx(want.metrics[k], abs=1e-3), k
