"""Ensemble bundles: the beam search scores the weighted mean of the members' probabilities, the
bundle refuses changed or mismatched members, and evaluate/caption work on it (tiny world)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image

from captioning.bundle.catalog import list_bundles
from captioning.bundle.ensemble import make_ensemble
from captioning.bundle.format import BundleError, load_decoder
from captioning.bundle.records import read_records
from captioning.data import load_flickr8k
from captioning.inference.captioner import Captioner, EnsembleCaptioner
from captioning.inference.evaluate import evaluate, save_evaluation, split_features
from captioning.models.mixture import MemberFeatures
from captioning.serving.ray_bundle import bundle_sha256
from tests.scoring import word_logprobs

REPO = Path(__file__).resolve().parents[1]
PAIR = ("resnet50-attention", "vgg16-inject")  # grid + pooled, two encoders


@pytest.fixture
def models(tiny_world, tmp_path, monkeypatch):
    """A private copy of the tiny world's bundles (tests write ensembles beside them)."""
    root = tmp_path / "models"
    shutil.copytree(tiny_world.models, root)
    for key, value in (("CAPTIONING_MODELS", root), ("CAPTIONING_DATA", tiny_world.data),
                       ("CAPTIONING_CACHE", tiny_world.cache)):  # fmt: skip
        monkeypatch.setenv(key, str(value))
    return root


@pytest.mark.slow
def test_score_is_the_log_of_the_members_mean_probability(models):
    make_ensemble(models / "ens", PAIR, [3.0, 1.0])
    ens = Captioner.load("ens", precision="fp32", runtime="torch")
    assert isinstance(ens, EnsembleCaptioner) and [m.name for m in ens.members] == list(PAIR)
    img = Image.fromarray(skimage.data.astronaut())
    res = ens.caption(img, beam_size=3)
    assert res.text and res.attention.shape == (len(res.tokens), 7, 7)  # the attending member's
    ids = ens.vocab.encode(res.text, add_special=False)
    per_member = [word_logprobs(m, img, ids) for m in ens.members]  # [T] each
    mixed = torch.logsumexp(torch.stack(per_member) + torch.tensor([[0.75], [0.25]]).log(), 0)
    assert res.score == pytest.approx(float(mixed.sum()), abs=2e-3)
    # not what either member alone gives the same caption
    for lp in per_member:
        assert abs(float(lp.sum()) - res.score) > 1e-2


@pytest.mark.slow
def test_a_member_with_almost_all_the_weight_decodes_like_that_member(models):
    make_ensemble(models / "ens", PAIR, [1.0, 1e-9])
    ens = Captioner.load("ens", precision="fp32", runtime="torch")
    alone = Captioner.load(PAIR[0], precision="fp32", runtime="torch")
    for photo in ("chelsea", "coffee", "rocket"):
        img = Image.fromarray(getattr(skimage.data, photo)())
        a, b = ens.caption(img, beam_size=3), alone.caption(img, beam_size=3)
        assert [t for t, _ in a.nbest] == [t for t, _ in b.nbest]
        assert [s for _, s in a.nbest] == pytest.approx([s for _, s in b.nbest], abs=1e-4)


@pytest.mark.slow
def test_evaluate_and_record_an_ensemble(models, tiny_world):
    make_ensemble(models / "ens", PAIR)
    ens = Captioner.load("ens", precision="fp32", runtime="torch")
    ds = load_flickr8k(tiny_world.data)
    names = ds.splits["dev"]
    feats = split_features(ens, ds, names, tiny_world.cache)
    assert isinstance(feats, MemberFeatures) and feats.shape[0] == len(names)
    assert feats[0].dim() == 3 and feats[1].dim() == 2  # the grid, then the pooled vector
    ev = evaluate(ens, ds, "dev", 2, cache_root=tiny_world.cache, meteor=False)
    assert ev.metrics["n_images"] == len(names) and 0 <= ev.metrics["bleu4"] <= 100
    assert ev.setting.precision == "fp32" and ev.setting.runtime == "torch"
    save_evaluation(ev, models / "ens")
    (rec,) = read_records(models / "ens")
    assert rec["split"] == "dev" and rec["precision"] == "fp32"
    card = (models / "ens" / "card.md").read_text()
    assert "resnet50-attention" in card and "vgg16-inject" in card
    info = next(b for b in list_bundles(models) if b.name == "ens")
    assert info.encoder == "resnet50,vgg16" and info.decoder == "ensemble"
    digest = bundle_sha256(models / "ens")  # what `batch` stamps on its rows
    make_ensemble(models / "ens", PAIR, [2.0, 1.0], force=True)
    assert bundle_sha256(models / "ens") != digest


@pytest.mark.slow
def test_changed_missing_or_mismatched_members_are_refused(models):
    make_ensemble(models / "ens", PAIR)
    with pytest.raises(BundleError, match="no decoder of its own"):
        load_decoder(models / "ens")
    with pytest.raises(BundleError, match="not empty"):
        make_ensemble(models / "ens", PAIR)
    with pytest.raises(BundleError, match="at least two"):
        make_ensemble(models / "one", PAIR[:1])
    with pytest.raises(BundleError, match="one weight > 0"):
        make_ensemble(models / "w", PAIR, [1.0, -1.0])
    with pytest.raises(BundleError, match="not ensembles"):
        make_ensemble(models / "nested", ("ens", PAIR[0]))
    assert not (models / "one").exists() and not (models / "nested").exists()
    # a hand-edited config
    good = (models / "ens" / "config.json").read_text()
    cfg = json.loads(good)
    cfg["members"][1]["weight"] = "heavy"
    (models / "ens" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="'members' must list"):
        Captioner.load("ens")
    assert "ens" not in [b.name for b in list_bundles(models)]
    (models / "ens" / "config.json").write_text(good)
    # a member retrained after the ensemble was scored
    weights = models / PAIR[1] / "decoder.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-2] + bytes([original[-2] ^ 1, original[-1]]))
    with pytest.raises(BundleError, match="changed since ensemble ens"):
        Captioner.load("ens")
    weights.write_bytes(original)
    assert Captioner.load("ens", precision="fp32", runtime="torch").caption(
        Image.fromarray(skimage.data.coffee())
    )
    # a member that is gone
    shutil.move(models / PAIR[1], models.parent / "away")
    with pytest.raises(BundleError, match="needs the bundle 'vgg16-inject' beside it"):
        Captioner.load("ens")
    shutil.move(models.parent / "away", models / PAIR[1])
    # members with different vocabularies
    vocab = json.loads((models / PAIR[1] / "vocab.json").read_text())
    vocab["itos"][4], vocab["itos"][5] = vocab["itos"][5], vocab["itos"][4]
    (models / PAIR[1] / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(BundleError, match="vocabular"):
        make_ensemble(models / "ens", PAIR, force=True)
    with pytest.raises(BundleError, match="vocabular"):
        Captioner.load("ens")


@pytest.mark.slow
def test_cli_makes_and_captions_with_an_ensemble(models, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "captioning", *args], capture_output=True,
                              text=True, cwd=REPO, timeout=600)  # fmt: skip

    made = cli("ensemble", *PAIR, "--weights", "2", "1")
    out = models / "-".join(PAIR)
    assert made.returncode == 0, made.stderr
    assert f"wrote {out}" in made.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert [m["weight"] for m in cfg["members"]] == pytest.approx([2 / 3, 1 / 3], abs=1e-6)
    photo = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(photo)
    cap = cli("caption", "--model", out.name, "--json", "--runtime", "torch", str(photo))
    assert cap.returncode == 0, cap.stderr
    line = json.loads(cap.stdout)
    assert line["caption"] and math.isfinite(line["logprob"])
    again = cli("ensemble", *PAIR)
    assert again.returncode != 0 and "not empty" in again.stderr and "Traceback" not in again.stderr
