"""Training end to end on a tiny Flickr8k-shaped data set of synthetic pictures, and resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from captioning.bundle import Captioner, list_bundles
from captioning.train import TrainConfig, main
from tests.synthetic import make_tiny_flickr


@pytest.fixture(scope="module")
def tiny_flickr(tmp_path_factory):
    return make_tiny_flickr(tmp_path_factory.mktemp("flickr"))


def config(**kw) -> TrainConfig:
    small = {"embed_dim": 32, "hidden_dim": 64, "attn_dim": 32, "dropout": 0.1}
    base = dict(
        encoder="resnet50",
        decoder="attention",
        epochs=3,
        batch_images=8,
        lr=3e-3,
        warmup_steps=2,
        patience=5,
        min_freq=1,
        precision="fp32",
        decoder_cfg=small,
        checkpoint_minutes=100.0,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_train_writes_history_checkpoint_and_bundle(tiny_flickr, cache_dir, tmp_path):
    out = tmp_path / "tiny-attention"
    result = main(config(), str(tiny_flickr), out, cache_dir, resume=False)
    assert not result["stopped"]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for key in (
        "train_loss",
        "dev_loss",
        "dev_bleu1",
        "dev_bleu4",
        "dev_cider",
        "lr",
        "epoch_seconds",
        "samples_per_s",
    ):
        assert key in history[0]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for f in ("decoder.safetensors", "config.json", "vocab.json", "metrics.json", "card.md"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["encoder"] == "resnet50" and cfg["decoder"] == "attention"
    assert len(cfg["encoder_sha256"]) == 64 and cfg["train_config"]["epochs"] == 3
    assert all(v.dtype == torch.float16 for v in load_file(out / "decoder.safetensors").values())
    assert [b.name for b in list_bundles(tmp_path)] == ["tiny-attention"]
    cap = Captioner.load(out, precision="fp32")
    res = cap.caption(tiny_flickr / "Images" / "0000_synthetic.png", beam_size=2)
    assert res.text and res.attention is not None and res.attention.shape[1:] == (7, 7)
    with pytest.raises(ValueError, match="--resume"):
        main(config(), str(tiny_flickr), out, cache_dir, resume=False)


def test_interrupted_training_resumes_identically(tiny_flickr, cache_dir, tmp_path):
    cfg = config(decoder="inject", epochs=2)
    straight = tmp_path / "straight"
    main(cfg, str(tiny_flickr), straight, cache_dir, resume=False)

    resumed = tmp_path / "resumed"
    killed = config(decoder="inject", epochs=2, max_minutes=1e-9)  # stops after one batch
    assert main(killed, str(tiny_flickr), resumed, cache_dir, resume=False)["stopped"]
    state = json.loads((resumed / "train_state" / "state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == 1
    main(cfg, str(tiny_flickr), resumed, cache_dir, resume=True)

    a = load_file(straight / "train_state" / "state.safetensors")
    b = load_file(resumed / "train_state" / "state.safetensors")
    for k in a:
        if k.startswith(("model.", "opt.")):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ha = json.loads((straight / "history.json").read_text())
    hb = json.loads((resumed / "history.json").read_text())
    assert [h["train_loss"] for h in ha] == pytest.approx([h["train_loss"] for h in hb], rel=1e-4)


def test_resume_refuses_other_settings(tiny_flickr, cache_dir, tmp_path):
    out = tmp_path / "run"
    main(config(decoder="merge", epochs=1), str(tiny_flickr), out, cache_dir, resume=False)
    with pytest.raises(ValueError, match="other settings"):
        main(
            config(decoder="merge", epochs=1, lr=1.0), str(tiny_flickr), out, cache_dir, resume=True
        )
