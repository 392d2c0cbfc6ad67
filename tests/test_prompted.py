"""Prompted captions, confidence and the classifier's second opinion on the shipped bundles."""

from __future__ import annotations

import json
import math

import pytest
import skimage.data
from PIL import Image

from captioning import Captioner
from captioning.bundle.catalog import list_bundles
from captioning.core.paths import MODELS_DIR, SAMPLES_DIR
from captioning.inference.captioner import PrefixError
from captioning.inference.labels import MAX_LABELS
from captioning.models.confidence import FORMS, confidence, spearman
from tests.scoring import word_logprobs

SHIPPED = {b.name for b in list_bundles(MODELS_DIR)}
CAT = SAMPLES_DIR / "chelsea.jpg"
needs = pytest.mark.skipif(
    not {"resnet50-attention", "attention-ensemble", "vgg16-merge"} <= SHIPPED,
    reason=f"the shipped bundles are not in {MODELS_DIR}",
)


# -- confidence ----------------------------------------------------------------------------------


def test_confidence_forms_stay_in_zero_one_and_order_sure_before_unsure():
    sure, unsure = [-0.01, -0.05, -0.02], [-0.01, -3.0, -2.0]
    for form in FORMS:
        a, b = confidence(sure, form), confidence(unsure, form)
        assert 0.0 <= b < a <= 1.0, form
    assert confidence([math.log(0.5), math.log(1.0)], "mean_word_prob") == pytest.approx(0.75)
    assert confidence([math.log(0.25), math.log(1.0)], "geo_mean_prob") == pytest.approx(0.5)
    assert confidence([math.log(0.25), math.log(0.5)], "min_word_prob") == pytest.approx(0.25)
    assert math.isnan(confidence([]))
    with pytest.raises(ValueError, match="unknown confidence form"):
        confidence([-1.0], "nope")


def test_spearman_ranks_with_ties_like_the_textbook():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4)
    assert spearman([5, 5, 7, 9], [1, 2, 3, 4]) == pytest.approx(0.9486833)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


# -- prompted captions and labels on the shipped bundles ------------------------------------------


@pytest.fixture(scope="module")
def attention():
    return Captioner.load(MODELS_DIR / "resnet50-attention", precision="fp32", runtime="torch")


@needs
def test_a_prefix_starts_the_caption_and_costs_log_prob(attention):
    free = attention.caption(CAT)
    prompted = attention.caption(CAT, prefix="A Cat")
    assert prompted.tokens[:2] == ["a", "cat"] and prompted.prefix == "A Cat"
    assert "cat" not in free.tokens  # the free caption calls the cat something else
    assert prompted.score < free.score  # the free caption is the search's best
    assert 0.0 < prompted.confidence < 1.0 and 0.0 < free.confidence < 1.0


@needs
@pytest.mark.parametrize("prefix", ["", "a dog", "two people are"])
def test_word_logprobs_and_confidence_are_the_models_own(attention, prefix):
    img = Image.open(CAT).convert("RGB")
    res = attention.caption(img, prefix=prefix or None, n_best=1)
    ids = [attention.vocab.stoi[w] for w in res.tokens]
    forced = word_logprobs(attention, img, ids)  # [len + 1]
    assert float(forced.sum()) == pytest.approx(res.score, abs=1e-3)
    expected = float(forced.mean().exp())  # the geometric mean of the probabilities
    assert res.confidence == pytest.approx(expected, abs=1e-4)


@needs
def test_a_word_outside_the_vocabulary_is_named_never_unk(attention):
    with pytest.raises(PrefixError, match="'zyzzyva' is not in the vocabulary of resnet50"):
        attention.caption(CAT, prefix="a zyzzyva")
    with pytest.raises(PrefixError, match="'qqq', 'zzz' are not"):
        attention.caption(CAT, prefix="qqq zzz qqq")
    with pytest.raises(PrefixError, match="holds no words"):
        attention.caption(CAT, prefix="!!!")
    long = " ".join(["a dog"] * 20)
    with pytest.raises(PrefixError, match="at most"):
        attention.caption(CAT, prefix=long)


@needs
def test_an_ensemble_takes_a_prefix_too():
    ens = Captioner.load(MODELS_DIR / "attention-ensemble")
    res = ens.caption(CAT, prefix="a cat")
    assert res.tokens[:2] == ["a", "cat"] and 0 < res.confidence < 1


@needs
def test_labels_are_resnet50s_imagenet_opinion_and_vgg16_says_it_has_none(attention):
    labels = attention.labels(CAT, 3)
    assert labels.encoder == "resnet50" and labels.unavailable is None
    assert labels.top[0][0] == "Egyptian cat" and labels.top[0][1] > 0.5
    assert [p for _, p in labels.top] == sorted((p for _, p in labels.top), reverse=True)
    coffee = attention.labels(Image.fromarray(skimage.data.coffee()), 5)
    assert "espresso" in [lb for lb, _ in coffee.top] or "cup" in [lb for lb, _ in coffee.top]
    vgg = Captioner.load(MODELS_DIR / "vgg16-merge").labels(CAT, 3)
    assert vgg.top == [] and "no ImageNet classifier head" in vgg.unavailable
    for bad in (0, MAX_LABELS + 1, "3"):
        with pytest.raises(ValueError, match="labels must be an integer"):
            attention.labels(CAT, bad)


# -- the caption command ---------------------------------------------------------------------------


@needs
def test_caption_defaults_to_the_best_single_model_and_prints_prefix_labels_confidence(capsys):
    from captioning.bundle.reports import best_single_bundle
    from captioning.cli import main

    best = best_single_bundle(list_bundles(MODELS_DIR)).name
    assert best == "resnet50-attention"  # dev chooses it; the ensemble is not a single model
    argv = ["caption", "--json", "--prefix", "a cat", "--labels", "2", "--runtime", "torch"]
    assert main([*argv, str(CAT)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["caption"].startswith("a cat ") and 0 < rec["confidence"] < 1
    assert rec["labels"]["source"] == "resnet50 ImageNet classifier"
    assert rec["labels"]["top"][0]["label"] == "Egyptian cat"


@needs
def test_caption_refuses_a_word_outside_the_vocabulary_by_name(capsys):
    from captioning.cli import EXIT_USER_ERROR, main

    assert main(["caption", "--prefix", "a zyzzyva", str(CAT)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "'zyzzyva' is not in the vocabulary of resnet50-attention" in err
    assert "Traceback" not in err


def test_caption_and_bench_serve_share_their_default_model():
    from captioning.cli import build_parser

    parser = build_parser(["caption", "bench-serve"])
    assert parser.parse_args(["caption", "x.jpg"]).model is None
    assert parser.parse_args(["bench-serve"]).model is None  # both resolve to default_model()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("caption", "bench-serve"):
        text = sub[name].format_help().replace("\n", " ")
        assert "best single model on dev" in " ".join(text.split())
