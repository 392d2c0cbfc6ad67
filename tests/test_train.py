"""Training end to end on a tiny Flickr8k-shaped data set of synthetic pictures, and resume.

Also: one model per output directory (``--force``/``--resume``), checkpoints that a crash cannot
tear, and torchvision encoders through to the exported bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captioning import Captioner
from captioning.bundle.catalog import list_bundles
from captioning.bundle.history import SELECT_METRIC
from captioning.models.decoders import DecoderConfig, build_decoder, caption_loss
from captioning.runtime.features import Features
from captioning.runtime.openvino import openvino_module
from captioning.training.checkpoint import read_state
from captioning.training.data import TrainData, batch_counts, make_batch
from captioning.training.distributed import shard
from captioning.training.train import TrainConfig, main
from captioning.training.xe import TeacherForcing, lr_factor, shard_loss
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


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_shard_losses_average_to_the_whole_batch_step(smoothing):
    """Each rank's loss is weighted by its share of next-word targets and captions, so the
    gradients DDP averages over 2 ranks are one process's gradients on the whole batch."""
    torch.manual_seed(0)
    dcfg = DecoderConfig(
        kind="attention",
        vocab_size=12,
        feat_dim=8,
        embed_dim=8,
        hidden_dim=8,
        attn_dim=8,
        dropout=0.0,
        alpha_c=1.0,
    )
    net = TeacherForcing(build_decoder(dcfg))
    names, grid = ["a", "b", "c"], torch.randn(3, 4, 8)  # [N, L, C]
    caps = {"a": [[1, 5, 6, 2], [1, 7, 2]], "b": [[1, 8, 9, 10, 2]], "c": [[1, 4, 2], [1, 3, 2]]}
    data = TrainData(None, Features(names, grid.mean(1), grid), names, [], caps, {})

    def step(mine: list[str], tok_share: float = 1.0, cap_share: float = 1.0):
        net.zero_grad()
        logits, alphas = net(*make_batch(data, mine, True))  # [B, T-1, V]
        tokens = make_batch(data, mine, True)[2]
        loss, _ = shard_loss(logits, tokens, alphas, 1.0, tok_share, cap_share, smoothing)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in net.parameters()]

    whole, want = step(names)
    n_tok, n_cap = batch_counts(data, names)
    terms = []
    for rank in range(2):
        m_tok, m_cap = batch_counts(data, shard(names, rank, 2))
        terms.append(step(shard(names, rank, 2), 2 * m_tok / n_tok, 2 * m_cap / n_cap))
    assert (terms[0][0] + terms[1][0]) / 2 == pytest.approx(whole, rel=1e-6)
    for w, g0, g1 in zip(want, terms[0][1], terms[1][1], strict=True):
        torch.testing.assert_close((g0 + g1) / 2, w, atol=1e-6, rtol=1e-5)
    logits, alphas = net(*make_batch(data, names, True))
    plain, _ = caption_loss(
        logits, make_batch(data, names, True)[2], alphas, 1.0, label_smoothing=smoothing
    )
    assert float(plain) == pytest.approx(whole, rel=1e-6)  # one process: the plain loss


def test_the_learning_rate_warms_up_then_follows_a_cosine_to_two_percent():
    factors = [lr_factor(s, total=12, warmup=2) for s in range(13)]
    assert factors[:3] == [0.5, 1.0, 1.0]  # warmup, then the cosine starts at its peak
    assert all(a > b for a, b in zip(factors[2:12], factors[3:13], strict=False))
    assert factors[12] == pytest.approx(0.02)


@pytest.mark.slow
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
    cap = Captioner.load(out, precision="fp32", runtime="torch")
    res = cap.caption(tiny_flickr / "Images" / "0000_synthetic.png", beam_size=2)
    assert res.text and res.attention is not None and res.attention.shape[1:] == (7, 7)
    with pytest.raises(ValueError, match="--resume"):
        main(config(), str(tiny_flickr), out, cache_dir, resume=False)


@pytest.mark.slow
def test_interrupted_training_resumes_identically(tiny_flickr, cache_dir, tmp_path):
    cfg = config(decoder="inject", epochs=2)
    straight = tmp_path / "straight"
    main(cfg, str(tiny_flickr), straight, cache_dir, resume=False)

    resumed = tmp_path / "resumed"
    killed = config(decoder="inject", epochs=2, max_minutes=1e-9)  # stops after one batch
    assert main(killed, str(tiny_flickr), resumed, cache_dir, resume=False)["stopped"]
    state, _ = read_state(resumed)
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


@pytest.mark.slow
def test_resume_refuses_other_settings(tiny_flickr, cache_dir, tmp_path):
    out = tmp_path / "run"
    main(config(decoder="merge", epochs=1), str(tiny_flickr), out, cache_dir, resume=False)
    with pytest.raises(ValueError, match="other settings"):
        main(
            config(decoder="merge", epochs=1, lr=1.0), str(tiny_flickr), out, cache_dir, resume=True
        )


@pytest.mark.slow
def test_resume_with_more_patience_continues_a_run_patience_stopped(
    tiny_flickr, cache_dir, tmp_path
):
    """lr 0 keeps the weights, so dev never improves: patience 1 stops after epoch 2. Resumed with
    patience 3, the same run goes on to its planned last epoch (the schedule is unchanged)."""
    out = tmp_path / "run"
    kw = dict(decoder="merge", epochs=3, lr=0.0)
    main(config(patience=1, **kw), str(tiny_flickr), out, cache_dir, resume=False)
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2]
    main(config(patience=3, **kw), str(tiny_flickr), out, cache_dir, resume=True)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert len({h["dev_cider"] for h in history}) == 1  # the weights never changed


BUNDLE_FILES = {
    "decoder.safetensors": b"old weights",
    "config.json": b'{"old": true}',
    "vocab.json": b'{"itos": ["old"]}',
    "history.json": b'[{"epoch": 99}]',
    "metrics.json": b'{"records": ["old"]}',
    "predictions_test_beam3.csv": b"image,caption\nx.jpg,old\n",
    "bench.json": b'{"old": 1}',
    "card.md": b"# old card\n",
}


def old_bundle(path):
    """A directory shaped like a shipped bundle of some other model (no train_state)."""
    path.mkdir(parents=True)
    for name, data in BUNDLE_FILES.items():
        (path / name).write_bytes(data)
    (path / "NOTES.txt").write_bytes(b"mine")
    return path


def test_non_empty_out_is_refused_without_resume_or_force(tiny_flickr, cache_dir, tmp_path):
    out = old_bundle(tmp_path / "shipped")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="not empty.*--resume.*--force"):
        main(config(epochs=1), str(tiny_flickr), out, cache_dir, resume=False)
    with pytest.raises(ValueError, match="no training run"):
        main(config(epochs=1), str(tiny_flickr), out, cache_dir, resume=True)
    with pytest.raises(ValueError, match="exclude"):
        main(config(epochs=1), str(tiny_flickr), out, cache_dir, resume=True, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


@pytest.mark.slow
def test_force_replaces_everything_of_the_old_weights(tiny_flickr, cache_dir, tmp_path):
    out = old_bundle(tmp_path / "shipped")
    main(config(decoder="inject", epochs=1), str(tiny_flickr), out, cache_dir, False, force=True)
    for name, old in BUNDLE_FILES.items():
        assert not (out / name).exists() or (out / name).read_bytes() != old, name
    assert not list(out.glob("predictions_*")) and not (out / "bench.json").exists()
    assert (out / "NOTES.txt").read_bytes() == b"mine"  # not ours: kept
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["decoder"] == "inject" and cfg["best_epoch"] == 1
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1]
    cap = Captioner.load(
        out, precision="fp32", runtime="torch"
    )  # vocab, config and weights belong together
    assert cap.caption(tiny_flickr / "Images" / "0000_synthetic.png").text


@pytest.mark.slow
def test_resumed_export_keeps_nothing_of_the_earlier_weights(tiny_flickr, cache_dir, tmp_path):
    out = tmp_path / "run"
    main(config(decoder="merge", epochs=1), str(tiny_flickr), out, cache_dir, resume=False)
    (out / "predictions_dev_beam3.csv").write_text("image,caption\nx.jpg,epoch one\n")
    (out / "bench.json").write_text('{"from": "epoch one"}')
    first_metrics = (out / "metrics.json").read_bytes()
    (out / "metrics.json").write_text('{"records": [{"from": "epoch one"}]}')
    main(config(decoder="merge", epochs=1), str(tiny_flickr), out, cache_dir, resume=True)
    assert not (out / "predictions_dev_beam3.csv").exists() and not (out / "bench.json").exists()
    assert (out / "metrics.json").read_bytes() == first_metrics  # empty again
    assert "epoch one" not in (out / "card.md").read_text()
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1]


@pytest.mark.slow
def test_a_crash_between_checkpoint_writes_cannot_tear_the_state(
    tiny_flickr, cache_dir, tmp_path, monkeypatch
):
    """Kill the run while the second checkpoint is being published; resume must agree.

    Weights, optimizer state, bookkeeping and best weights live in one file, so the resumed run
    never pairs one epoch's weights with another epoch's bookkeeping (which would train an
    epoch twice).
    """
    from captioning.core import files as fileio

    cfg = config(decoder="inject", epochs=2)
    straight = tmp_path / "straight"
    main(cfg, str(tiny_flickr), straight, cache_dir, resume=False)

    out = tmp_path / "crashed"
    real_replace = fileio.os.replace
    landed = []

    class Crash(BaseException):
        pass

    def replace(src, dst):
        if len([d for d in landed if d.endswith("train_state/state.safetensors")]) == 2:
            raise Crash(dst)  # the process dies before this file is published
        real_replace(src, dst)
        landed.append(str(dst))

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(Crash):
        main(cfg, str(tiny_flickr), out, cache_dir, resume=False)
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    meta, tensors = read_state(out)
    assert meta["epoch"] == 3 and [h["epoch"] for h in meta["history"]] == [1, 2]
    assert any(k.startswith("best.") for k in tensors)  # the best weights are in the same file

    main(cfg, str(tiny_flickr), out, cache_dir, resume=True)
    a, b = load_file(straight / "decoder.safetensors"), load_file(out / "decoder.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ha = json.loads((straight / "history.json").read_text())
    hb = json.loads((out / "history.json").read_text())
    assert [h["train_loss"] for h in hb] == [h["train_loss"] for h in ha]
    best = max(ha, key=lambda h: h[SELECT_METRIC])["epoch"]
    assert json.loads((out / "config.json").read_text())["best_epoch"] == best


@pytest.fixture
def offline_torchvision(tmp_path, monkeypatch):
    """torchvision's ResNet50 checkpoint as torch.hub would leave it, without the download.

    Only the network is replaced: the state dict is a real (seeded, untrained) torchvision
    ResNet50, its file lies where ``torch.hub`` keeps downloads, and the project's own loading,
    key conversion and hashing run unchanged.
    """
    from torchvision import models

    from captioning.models import encoders
    from captioning.runtime import encoders as rt_enc

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = encoders.get_spec("resnet50-tv")
    ckpt = encoders.torchvision_checkpoint(spec)
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    state = models.resnet50(weights=None).state_dict()
    ckpt.write_bytes(b"stand-in for the downloaded file " + str(len(state)).encode())

    def load_state_dict_from_url(url, **kw):
        assert Path(url).name == ckpt.name
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", load_state_dict_from_url)
    rt_enc.shared_encoder.cache_clear()
    yield ckpt
    rt_enc.shared_encoder.cache_clear()


@pytest.mark.slow
def test_torchvision_encoder_trains_and_exports(offline_torchvision, cache_dir, tmp_path):
    """``train --encoder resnet50-tv`` trains, exports a bundle that records the torchvision
    weights' sha256, and captions with it."""
    from captioning.core.files import sha256_file
    from captioning.models.encoders import weights_sha256

    data = make_tiny_flickr(tmp_path / "flickr", sizes={"train": 6, "dev": 3, "test": 1})
    out = tmp_path / "tv-inject"
    cfg = config(encoder="resnet50-tv", decoder="inject", epochs=1)
    main(cfg, str(data), out, cache_dir, resume=False)
    sha = json.loads((out / "config.json").read_text())["encoder_sha256"]
    assert sha == sha256_file(offline_torchvision) == weights_sha256("resnet50-tv")
    cap = Captioner.load(
        out, precision="fp32", runtime="torch"
    )  # checks the encoder's sha against the bundle's
    assert cap.caption(data / "Images" / "0000_synthetic.png").text


@pytest.mark.skipif(openvino_module() is None, reason="needs openvino")
@pytest.mark.slow
def test_train_reads_the_openvino_feature_cache_and_records_it(tiny_flickr, tmp_path):
    """``--runtime openvino``: missing features are extracted by OpenVINO into its own cache
    (``…-fp32-openvino``), the torch cache is never made, and the bundle records the runtime."""
    cache = tmp_path / "cache"
    out = tmp_path / "tiny-par-inject"
    cfg = config(
        decoder="inject",
        epochs=1,
        runtime="openvino",
        decoder_cfg={"embed_dim": 16, "hidden_dim": 32, "inject_mode": "par"},
    )
    assert not main(cfg, str(tiny_flickr), out, cache, resume=False)["stopped"]
    feature_dirs = sorted(p.name for p in cache.iterdir() if p.name.startswith("resnet50-"))
    assert len(feature_dirs) == 1 and feature_dirs[0].endswith("-fp32-openvino"), feature_dirs
    saved = json.loads((out / "config.json").read_text())
    assert saved["train_config"]["runtime"] == "openvino"
    assert saved["runtime"] == "openvino"  # of the features the decoder was trained on
    assert saved["decoder_config"]["inject_mode"] == "par"
    cap = Captioner.load(out, precision="fp32", runtime="torch")
    assert cap.caption(tiny_flickr / "Images" / "0000_synthetic.png", beam_size=2).text


@pytest.mark.slow
def test_init_warm_starts_the_decoder_and_checks_it_fits(tiny_flickr, cache_dir, tmp_path):
    """``train --init BUNDLE`` (cross-entropy) starts from the bundle's decoder weights: its first
    dev loss is the bundle's level, not a fresh decoder's; a bundle that does not fit is refused
    with the field that differs, before anything is written."""
    first = tmp_path / "first"
    main(config(epochs=2), str(tiny_flickr), first, cache_dir, resume=False)
    fresh = json.loads((first / "history.json").read_text())
    warm = tmp_path / "warm"
    main(config(epochs=1, init=str(first), lr=1e-6), str(tiny_flickr), warm, cache_dir, False)
    again = json.loads((warm / "history.json").read_text())
    best = min(h["dev_loss"] for h in fresh)
    assert abs(again[-1]["dev_loss"] - best) < 0.05 * best < fresh[0]["dev_loss"] - best
    cfg = json.loads((warm / "config.json").read_text())
    assert cfg["train_config"]["init"] == str(first)
    # the bundle's history continues the starting one's: 2 xe epochs, then this run's as epoch 3
    history = json.loads((warm / "history.json").read_text())
    assert [(h["stage"], h["epoch"]) for h in history] == [("xe", 1), ("xe", 2), ("xe", 3)]
    assert history[-1]["stage_epoch"] == 1 and cfg["best_epoch"] == 3
    assert history[:2] == [{"stage": "xe", **h} for h in fresh]
    wide = {"embed_dim": 32, "hidden_dim": 96, "attn_dim": 32, "dropout": 0.1}
    with pytest.raises(ValueError, match="hidden_dim=64"):
        main(
            config(init=str(first), decoder_cfg=wide),
            str(tiny_flickr),
            tmp_path / "w",
            cache_dir,
            False,
        )
    with pytest.raises(ValueError, match="attention bundle; this run trains resnet50 \\+ merge"):
        main(
            config(init=str(first), decoder="merge"),
            str(tiny_flickr),
            tmp_path / "m",
            cache_dir,
            False,
        )
    assert not (tmp_path / "w").exists() and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_an_updown_bundle_trains_and_captions_on_either_runtime(tiny_flickr, cache_dir, tmp_path):
    """The two-LSTM decoder goes through training, export and captioning like any other; its
    compiled step (four state tensors) gives torch's captions."""
    from captioning.runtime import decoders as rt_dec
    from captioning.runtime import openvino as runtime

    out = tmp_path / "tiny-updown"
    main(config(decoder="updown", epochs=2), str(tiny_flickr), out, cache_dir, resume=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["decoder"] == "updown" and cfg["decoder_config"]["kind"] == "updown"
    photo = tiny_flickr / "Images" / "0000_synthetic.png"
    ref = Captioner.load(out, precision="fp32", runtime="torch").caption(photo, beam_size=3)
    assert ref.text and ref.attention.shape == (len(ref.tokens), 7, 7)
    assert abs(ref.attention.sum((1, 2)) - 1).max() < 1e-4  # each word's map sums to 1
    if runtime.openvino_module() is None:
        pytest.skip("openvino is not installed: the torch half ran")
    fast = Captioner.load(out, precision="fp32", runtime="openvino")
    assert rt_dec.runtime_of(fast.step_decoder) == "openvino"
    assert fast.caption(photo, beam_size=3).tokens == ref.tokens


@pytest.mark.slow
def test_export_best_exports_an_unfinished_runs_best_epoch_and_leaves_it_resumable(
    tiny_flickr, cache_dir, tmp_path
):
    kw = dict(decoder="merge", epochs=2, batch_images=24)  # 2 batches an epoch
    straight = tmp_path / "straight"
    main(config(**kw), str(tiny_flickr), straight, cache_dir, resume=False)
    run, killed = tmp_path / "run", config(max_minutes=1e-9, **kw)  # one batch a call
    with pytest.raises(ValueError, match="pass --resume"):
        main(config(**kw), str(tiny_flickr), run, cache_dir, resume=False, export_best=True)
    assert not run.exists()
    assert main(killed, str(tiny_flickr), run, cache_dir, resume=False)["stopped"]
    with pytest.raises(ValueError, match="has finished yet"):
        main(config(**kw), str(tiny_flickr), run, cache_dir, resume=True, export_best=True)
    while read_state(run)[0]["epoch"] == 1:  # on to epoch 2's first batch
        assert main(killed, str(tiny_flickr), run, cache_dir, resume=True)["stopped"]
    state = (run / "train_state" / "state.safetensors").read_bytes()
    result = main(config(**kw), str(tiny_flickr), run, cache_dir, resume=True, export_best=True)
    assert not result["stopped"] and result["best_epoch"] == 1
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1]
    assert (run / "train_state" / "state.safetensors").read_bytes() == state  # untouched
    assert (
        Captioner.load(run, precision="fp32", runtime="torch")
        .caption(tiny_flickr / "Images" / "0000_synthetic.png")
        .text
    )
    with pytest.raises(ValueError, match="stopped inside epoch 2"):  # --export-last: not mid-epoch
        main(config(**kw), str(tiny_flickr), run, cache_dir, resume=True, export_last=True)
    with pytest.raises(ValueError, match="choose one"):
        main(
            config(**kw),
            str(tiny_flickr),
            run,
            cache_dir,
            resume=True,
            export_best=True,
            export_last=True,
        )
    main(config(**kw), str(tiny_flickr), run, cache_dir, resume=True)  # the run goes on
    a = load_file(straight / "train_state" / "state.safetensors")
    b = load_file(run / "train_state" / "state.safetensors")
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2]
    # --export-last: the latest finished epoch's weights, whatever dev preferred
    result = main(config(**kw), str(tiny_flickr), run, cache_dir, resume=True, export_last=True)
    assert result["best_epoch"] == 2
    assert json.loads((run / "config.json").read_text())["best_epoch"] == 2
    exported = load_file(run / "decoder.safetensors")
    for k, v in exported.items():
        torch.testing.assert_close(v.float(), b[f"model.{k}"].float(), atol=2e-3, rtol=2e-3)
