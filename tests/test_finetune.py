"""Fine-tuning the encoder's last block: the cached block input, training, the bundle's block.

Unit tests use a tiny trunk made here (conv + BN stem, conv + BN block). The end-to-end test
fine-tunes the real ResNet50 layer4 for a few steps on a tiny synthetic Flickr8k, then captions
with the bundle; everything is written to tmp_path.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from captioning import cli
from captioning.bundle import reports
from captioning.bundle.format import BLOCK_FILE, BLOCK_KEY, BundleError
from captioning.core.files import sha256_file
from captioning.data import load_flickr8k
from captioning.inference.captioner import Captioner
from captioning.inference.evaluate import evaluate
from captioning.models.blocks import (
    FINETUNE_BLOCKS,
    BlockSpec,
    StemModel,
    block_spec,
    swap_block,
    tuned_sha256,
)
from captioning.models.decoders import DecoderConfig, build_decoder, caption_loss
from captioning.models.encoders import Encoder, get_spec, weights_path
from captioning.runtime import encoders as rt_enc
from captioning.runtime import openvino as runtime
from captioning.runtime.encoders import shared_encoder
from captioning.runtime.features import FeatureCache
from captioning.training.finetune import FinetuneModel, block_input_features, block_lr, param_groups
from captioning.training.train import TrainConfig, main
from captioning.training.xe import TeacherForcing
from tests.synthetic import make_tiny_flickr

TINY = BlockSpec("tiny", "tiny", start=3, input_name="mid", input_channels=8, input_side=8)


class TinyTrunk(nn.Module):
    """Encoder-shaped (norm, body, fc): a conv + BN stem, then a conv + BN block.

    [B, 3, 16, 16] -> stem [B, 8, 8, 8] -> block [B, 16, 4, 4].
    """

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Identity()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.fc = None
        for bn in (self.body[1], self.body[4]):  # statistics as a trained network has them
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)


def tiny_model(seed: int = 0) -> tuple[TinyTrunk, FinetuneModel]:
    torch.manual_seed(seed)
    trunk = TinyTrunk().eval()
    dcfg = DecoderConfig(
        kind="attention", vocab_size=12, feat_dim=16, embed_dim=8, hidden_dim=8, attn_dim=8
    )
    return trunk, FinetuneModel(trunk.body[TINY.start :], build_decoder(dcfg), TINY)


def hparams(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "weight_decay": 0.0, **kw})


def test_a_step_trains_the_block_but_not_its_batchnorm_statistics():
    trunk, model = tiny_model()
    block = model.block
    model.train()
    assert model.decoder.training and model.decoder.drop.training
    assert not block[1].training  # BN in eval: running statistics frozen
    before = {k: v.clone() for k, v in block.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, hparams()), lr=1e-2)
    stem_out = trunk.body[: TINY.start](torch.rand(3, 3, 16, 16))  # [3, 8, 8, 8]
    inputs = stem_out.flatten(2).transpose(1, 2)  # [3, 64, 8], the cache's layout
    tokens = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2], [1, 9, 2, 0]])
    logits, alphas = TeacherForcing(model)(inputs, torch.arange(3), tokens)
    loss, _ = caption_loss(logits, tokens, alphas, 1.0)
    loss.backward()
    opt.step()
    after = block.state_dict()
    for k in ("3.weight", "3.bias", "4.weight", "4.bias"):  # conv and BN affine train
        assert not torch.equal(after[k], before[k]), k
    for k in ("4.running_mean", "4.running_var", "4.num_batches_tracked"):
        assert torch.equal(after[k], before[k]), k
    block.train()  # the control: in train mode the same input would move the statistics
    block(stem_out)
    assert not torch.equal(block.state_dict()["4.running_mean"], before["4.running_mean"])


def test_block_features_match_the_whole_trunk():
    trunk, model = tiny_model()
    model.eval()
    x = torch.rand(2, 3, 16, 16)
    inputs = StemModel(trunk.norm, trunk.body[: TINY.start])(x).grid  # [2, 64, 8]
    want = trunk.body(x).flatten(2).transpose(1, 2)  # [2, 16, 16]
    torch.testing.assert_close(model.block_features(inputs), want)


def test_param_groups_give_the_block_its_own_lower_rate():
    _, model = tiny_model()
    groups = param_groups(model, hparams(lr=1e-3))
    block_ids = {id(p) for p in model.block.parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    for g in groups:
        in_block = {id(p) in block_ids for p in g["params"]}
        assert len(in_block) == 1
        assert g.get("lr") == (1e-4 if in_block == {True} else None)  # None: AdamW's lr
    assert block_lr(hparams(lr=1e-3, finetune_lr=3e-5)) == 3e-5
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-4, 1e-3]
    decoder_only = param_groups(model.decoder, hparams())  # a frozen-encoder run
    assert len(decoder_only) == 2 and all("lr" not in g for g in decoder_only)


def test_swap_block_copies_the_block_and_shares_the_rest():
    trunk, model = tiny_model()
    base = {k: v.clone() for k, v in trunk.state_dict().items()}
    state = {f"body.{k}": v + 1.0 for k, v in model.block.state_dict().items()}
    tuned = swap_block(trunk, TINY, state)
    for i in range(TINY.start):
        assert tuned.body[i] is trunk.body[i]
    assert tuned.body[3] is not trunk.body[3]
    torch.testing.assert_close(tuned.body[3].weight, base["body.3.weight"] + 1.0)
    for k, v in trunk.state_dict().items():  # the original is untouched
        assert torch.equal(v, base[k]), k
    with pytest.raises(ValueError, match="do not fit"):
        swap_block(trunk, TINY, {"body.3.weight": state["body.3.weight"]})


def test_block_specs_fit_the_architectures():
    assert block_spec("resnet50", "layer4").input_name == "layer3"
    assert block_spec("resnet50-tv", "layer4").start == 7
    assert block_spec("vgg16", "block5").input_name == "pool4"
    with pytest.raises(ValueError, match="block5"):
        block_spec("vgg16", "layer4")
    with pytest.raises(ValueError, match="layer4"):
        block_spec("resnet50", "block9")
    for name, block in (("resnet50", "layer4"), ("vgg16", "block5")):
        spec = FINETUNE_BLOCKS[block]
        with torch.device("meta"):  # the architecture only: shapes, no weights, no compute
            enc = Encoder(get_spec(name)).eval()
            mid = enc.body[: spec.start](torch.empty(1, 3, 224, 224))
            out = enc.body[spec.start :](mid)
        assert mid.shape == (1, spec.input_channels, spec.input_side, spec.input_side)
        assert out.shape[1] == get_spec(name).grid_channels
        assert out.shape[2] * out.shape[3] == get_spec(name).grid_cells


def test_cli_refuses_a_block_of_another_encoder(tmp_path, capsys):
    args = ["train", "--encoder", "vgg16", "--finetune", "layer4", "--out", str(tmp_path / "o")]
    assert cli.main(args) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --finetune layer4") and "block5" in err and "\n" not in err
    args = ["train", "--finetune-lr", "1e-5", "--out", str(tmp_path / "o")]
    assert cli.main(args) == cli.EXIT_USER_ERROR
    assert "add --finetune" in capsys.readouterr().err
    args = ["train", "--finetune", "layer4", "--runtime", "openvino", "--out", str(tmp_path / "o")]
    assert cli.main(args) == cli.EXIT_USER_ERROR
    assert "drop --runtime" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- end to end on ResNet50


def trunk_must_not_run(*args, **kwargs):
    raise AssertionError("the encoder's early layers ran during fine-tuning")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """layer4 + attention decoder fine-tuned for 2 steps; the layer3 cache made beforehand."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_tiny_flickr(root / "flickr", sizes={"train": 4, "dev": 2, "test": 2})
    cache, out = root / "cache", root / "resnet50-attention-ft"
    cfg = TrainConfig(
        encoder="resnet50",
        decoder="attention",
        epochs=1,
        batch_images=2,
        lr=3e-3,
        finetune="layer4",
        finetune_lr=1e-3,
        warmup_steps=1,
        patience=5,
        min_freq=1,
        precision="fp32",
        decoder_cfg={"embed_dim": 32, "hidden_dim": 64, "attn_dim": 32, "dropout": 0.1},
        checkpoint_minutes=100.0,
    )
    ds = load_flickr8k(data)
    block_input_features(ds, cfg, ds.splits["train"] + ds.splits["dev"], cache)
    with pytest.MonkeyPatch.context() as mp:  # from here on the trunk must never run
        for cls, name in ((StemModel, "forward"), (Encoder, "forward"), (Encoder, "feature_map")):
            mp.setattr(cls, name, trunk_must_not_run)
        result = main(cfg, str(data), out, cache, resume=False)
    assert not result["stopped"]
    return {"data": data, "cache": cache, "out": out, "ds": ds}


def shared_fp32():
    return shared_encoder("resnet50", "fp32", "torch")  # the instance Captioner.load shares


@pytest.mark.slow
def test_the_layer3_cache_holds_the_block_input(tuned):
    shared = shared_fp32()
    key = f"resnet50-{shared.sha256[:12]}-fp32-layer3"
    cache = FeatureCache(tuned["cache"] / key, "resnet50", shared.sha256, "fp32-layer3")
    manifest = cache.manifest()  # refuses a manifest of other weights or settings
    assert manifest["precision"] == "fp32-layer3" and manifest["weights_sha256"] == shared.sha256
    with safe_open(str(cache.directory / manifest["shards"][0]["file"]), "pt") as f:
        grid = f.get_tensor("grid")
    assert grid.dtype == torch.float16 and grid.shape[1:] == (196, 1024)
    # the cached input through layer4 gives the shared encoder's own grid (fp16 rounding aside)
    name = manifest["shards"][0]["images"][0]
    from captioning.runtime.pixels import load_pixels

    want = shared.encode(load_pixels(tuned["ds"].image_path(name))[None]).grid
    layer4 = shared.model.body[7:]
    with torch.inference_mode():
        x = grid[:1].float().transpose(1, 2).unflatten(2, (14, 14))
        got = layer4(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.01)


@pytest.mark.slow
def test_the_bundle_ships_the_tuned_block(tuned):
    out = tuned["out"]
    config = json.loads((out / "config.json").read_text())
    entry = config[BLOCK_KEY]
    assert entry == {
        "block": "layer4",
        "file": BLOCK_FILE,
        "sha256": sha256_file(out / BLOCK_FILE),
        "cached_input": "layer3",
    }
    assert config["train_config"]["finetune"] == "layer4"
    block = load_file(str(out / BLOCK_FILE))
    shipped = load_file(str(weights_path(get_spec("resnet50"))))
    assert set(block) == {k for k in shipped if k.startswith("body.7.")}
    for k, v in block.items():
        if "running_" in k:  # frozen BN statistics, fp32 as in the shipped encoder
            assert v.dtype == torch.float32 and torch.equal(v, shipped[k]), k
        else:  # every conv weight and BN affine weight trained
            assert v.dtype == torch.float16 and not torch.equal(v, shipped[k]), k
    assert not any(k.startswith("block.") for k in load_file(str(out / "decoder.safetensors")))
    card = (out / "card.md").read_text()
    assert "`layer4` fine-tuned with the decoder" in card and "(frozen)" not in card
    info = reports.bundle_info(out)
    assert reports.encoder_group(info) == "resnet50+layer4"
    assert f"| {info.name} | resnet50+layer4 | " in reports.comparison_markdown([info])


@pytest.mark.slow
def test_captioner_uses_the_tuned_block_and_leaves_the_shared_encoder_alone(tuned):
    out = tuned["out"]
    shared = shared_fp32()
    cap = Captioner.load(out, precision="fp32", runtime="torch")
    block_sha = sha256_file(out / BLOCK_FILE)
    assert cap.encoder.sha256 == tuned_sha256(shared.sha256, "layer4", block_sha)
    assert cap.encoder.sha256 != shared.sha256
    tuned_sd = cap.encoder.model.state_dict()
    for k, v in load_file(str(out / BLOCK_FILE)).items():
        assert torch.equal(tuned_sd[k], v.float()), k
    assert cap.encoder.model.body[6] is shared.model.body[6]  # the trunk is shared, not copied
    shipped = load_file(str(weights_path(get_spec("resnet50"))))
    for k, v in shared.model.state_dict().items():  # untouched
        if k.startswith("body.7.") and k in shipped:
            assert torch.equal(v, shipped[k].float()), k
    config = dict(cap.config)
    del config[BLOCK_KEY]
    frozen = Captioner(out, config, cap.decoder, cap.vocab, shared)  # same decoder, frozen block
    images = sorted((tuned["data"] / "Images").glob("*.png"))[:2]
    a, b = cap.caption_batch(images, beam_size=3), frozen.caption_batch(images, beam_size=3)
    assert [(r.text, round(r.score, 4)) for r in a] != [(r.text, round(r.score, 4)) for r in b]
    assert (
        Captioner.load(out, precision="fp32", runtime="torch").encoder is cap.encoder
    )  # built once


@pytest.mark.slow
def test_evaluation_caches_the_tuned_features_under_their_own_key(tuned):
    cap = Captioner.load(tuned["out"], precision="fp32", runtime="torch")
    ev = evaluate(cap, tuned["ds"], "test", 1, cache_root=tuned["cache"], meteor=False)
    assert ev.metrics["n_images"] == 2
    key = f"resnet50-{cap.encoder.sha256[:12]}-fp32"
    assert (tuned["cache"] / key / "manifest.json").is_file()
    frozen = shared_fp32().sha256[:12]
    assert not (tuned["cache"] / f"resnet50-{frozen}-fp32").exists()  # never the frozen one


def copy_with_changed_block(bundle, bad):
    """A copy of ``bundle`` at ``bad`` whose block file no longer matches its config.json."""
    shutil.copytree(bundle, bad, ignore=shutil.ignore_patterns("train_state"))
    state = load_file(str(bad / BLOCK_FILE))
    state["body.7.0.conv1.weight"][0, 0, 0, 0] += 1.0
    save_file(state, str(bad / BLOCK_FILE))
    return bad


@pytest.mark.slow
def test_a_changed_or_missing_block_is_refused(tuned, tmp_path, capsys):
    bad = copy_with_changed_block(tuned["out"], tmp_path / "bad")
    with pytest.raises(BundleError, match="sha256"):
        Captioner.load(bad, precision="fp32", runtime="torch")
    sample = next((tuned["data"] / "Images").glob("*.png"))
    args = ["caption", "--model", str(bad), str(sample), "--precision", "fp32"]
    assert cli.main(args) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bundle bad: encoder_block.safetensors has sha256")
    assert "\n" not in err
    (bad / BLOCK_FILE).unlink()
    with pytest.raises(BundleError, match=f"missing {BLOCK_FILE}"):
        Captioner.load(bad, precision="fp32", runtime="torch")


@pytest.mark.slow
def test_extract_finetune_fills_the_cache_training_reads(tuned, capsys):
    data, cache = str(tuned["data"]), str(tuned["cache"])
    args = [
        "extract",
        "--encoder",
        "resnet50",
        "--finetune",
        "layer4",
        "--precision",
        "fp32",
        "--data",
        data,
        "--cache",
        cache,
        "--limit",
        "3",
    ]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cache"].endswith("-fp32-layer3")
    # the first 3 names are train images: training's extraction already cached them (6 in all)
    assert (summary["new_images"], summary["total_images"]) == (0, 6)


@pytest.mark.slow
def test_init_from_a_finetuned_bundle_continues_its_block_and_decoder(tuned, tmp_path):
    """``train --init`` of a fine-tuned bundle with ``--finetune`` of the same block starts from
    its block and its decoder (a run at a vanishing rate exports them unchanged) and continues
    its history; without ``--finetune`` it is refused before anything is written."""
    start = tuned["out"]
    cfg = json.loads((start / "config.json").read_text())
    train_cfg = TrainConfig(**{**cfg["train_config"], "init": str(start), "lr": 1e-12})
    train_cfg.finetune_lr = 1e-12
    out = tmp_path / "more"
    main(train_cfg, str(tuned["data"]), out, tuned["cache"], resume=False)
    for name in (BLOCK_FILE, "decoder.safetensors"):
        before, after = load_file(str(start / name)), load_file(str(out / name))
        assert set(before) == set(after)
        for k, v in before.items():
            assert torch.equal(after[k], v), (name, k)
    history = json.loads((out / "history.json").read_text())
    assert [(h["stage"], h["epoch"]) for h in history] == [("finetune", 1), ("finetune", 2)]
    frozen = TrainConfig(**{**train_cfg.__dict__, "finetune": ""})
    with pytest.raises(ValueError, match="continue it with --finetune layer4"):
        main(frozen, str(tuned["data"]), tmp_path / "frozen", tuned["cache"], resume=False)
    assert not (tmp_path / "frozen").exists()


@pytest.mark.skipif(runtime.openvino_module() is None, reason="needs openvino")
@pytest.mark.slow
def test_a_cached_compile_loads_without_building_the_trunk(tuned, tmp_path, monkeypatch):
    """On OpenVINO, a fine-tuned bundle whose tuned encoder is in the compile cache loads it
    without building the torch trunk (start-up), with the same captions; its block file is
    still checked."""
    sample = next((tuned["data"] / "Images").glob("*.png"))
    first = Captioner.load(tuned["out"], precision="fp32", runtime="openvino")  # compiles
    assert first.encoder.runtime == "openvino" and first.encoder.model is not None
    want = first.caption(sample, beam_size=2)
    monkeypatch.setattr(rt_enc, "_TUNED", {})
    monkeypatch.setattr(Encoder, "__init__", trunk_must_not_run)  # no torch trunk from here on
    fast = Captioner.load(tuned["out"], precision="fp32", runtime="openvino")
    assert fast.encoder.model is None and fast.encoder.runtime == "openvino"
    assert fast.encoder.sha256 == first.encoder.sha256
    got = fast.caption(sample, beam_size=2)
    assert got.nbest == want.nbest
    bad = copy_with_changed_block(tuned["out"], tmp_path / "bad")
    with pytest.raises(BundleError, match="sha256"):
        Captioner.load(bad, precision="fp32", runtime="openvino")


@pytest.mark.slow
def test_scst_over_a_finetuned_bundle_keeps_its_block_frozen(tuned, tmp_path):
    from captioning.training.scst import ScstConfig, main_scst

    out = tmp_path / "scst"
    cfg = ScstConfig(
        init=str(tuned["out"]), epochs=1, batch_images=2, samples=2, lr=1e-2, patience=1, max_len=6
    )
    with pytest.MonkeyPatch.context() as mp:  # the cached layer3 inputs only: no trunk runs
        for cls, name in ((StemModel, "forward"), (Encoder, "forward"), (Encoder, "feature_map")):
            mp.setattr(cls, name, trunk_must_not_run)
        result = main_scst(cfg, str(tuned["data"]), out, tuned["cache"], resume=False)
    assert not result["stopped"]
    history = json.loads((out / "history.json").read_text())
    assert [h["stage"] for h in history] == ["finetune", "scst"]
    assert history[-1]["reward"] >= 0
    config = json.loads((out / "config.json").read_text())
    assert config[BLOCK_KEY]["block"] == "layer4"
    want, got = load_file(tuned["out"] / BLOCK_FILE), load_file(out / BLOCK_FILE)
    assert set(got) == set(want) and all(torch.equal(want[k], got[k]) for k in want)  # frozen
    cap = Captioner.load(out, precision="fp32", runtime="torch")
    assert cap.caption(tuned["data"] / "Images" / "0000_synthetic.png", beam_size=1).text
