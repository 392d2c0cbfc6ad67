"""The bundle format on a bundle made in the test: export, open with every check, records,
the catalog. No encoder runs, so these are fast; tests/test_bundle.py captions with real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from captioning.bundle.catalog import list_bundles, resolve_bundle
from captioning.bundle.ensemble import check_bundle
from captioning.bundle.export import export_bundle
from captioning.bundle.format import (
    BLOCK_KEY,
    DECODING_CHOSEN_KEY,
    BundleError,
    load_decoder,
    open_bundle,
    read_config,
    weights_fingerprint,
)
from captioning.bundle.records import (
    Setting,
    add_record,
    read_records,
    set_decode_defaults,
)
from captioning.data.vocab import Vocabulary
from captioning.models.decoders import DecoderConfig, build_decoder
from captioning.models.decoding import DecodeConfig
from captioning.training.train import TrainConfig

CAPTIONS = ["a dog runs on the grass", "a man rides a bike", "two dogs play in the water"]
SHA = "0" * 64  # the encoder weights the bundle records; no encoder is built here


def make_bundle(out: Path, kind: str = "merge", seed: int = 0) -> torch.nn.Module:
    """A real, tiny decoder with random weights, exported as a bundle."""
    torch.manual_seed(seed)
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    dcfg = DecoderConfig(kind=kind, vocab_size=len(vocab), feat_dim=8, embed_dim=8, hidden_dim=8)
    decoder = build_decoder(dcfg)
    cfg = TrainConfig(encoder="resnet50", decoder=kind, precision="fp32")
    export_bundle(
        out,
        decoder,
        vocab,
        cfg=cfg,
        dcfg=dcfg,
        history=[{"epoch": 1, "cider": 1.0}],
        best_epoch=1,
        commit=None,
        encoder_sha256=SHA,
        select_metric="cider",
    )
    return decoder


def test_an_exported_bundle_opens_with_its_weights_vocabulary_and_config(tmp_path):
    decoder = make_bundle(tmp_path / "tiny")
    bundle = open_bundle(tmp_path / "tiny")
    assert bundle.block is None and bundle.config["encoder_sha256"] == SHA
    assert bundle.vocab.itos == Vocabulary.build(CAPTIONS, min_freq=1).itos
    for k, v in decoder.state_dict().items():  # stored in fp16, read back in fp32
        torch.testing.assert_close(bundle.decoder.state_dict()[k], v.half().float())
    assert not bundle.decoder.training
    again, vocab, cfg = load_decoder(tmp_path / "tiny")
    assert cfg == bundle.config and vocab.itos == bundle.vocab.itos
    assert set(weights_fingerprint(tmp_path / "tiny")) == {"decoder.safetensors"}


def test_the_catalog_finds_complete_bundles_by_name_or_path(tmp_path):
    make_bundle(tmp_path / "b")
    make_bundle(tmp_path / "a", kind="inject")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    assert [b.name for b in list_bundles(tmp_path)] == ["a", "b"]
    assert resolve_bundle("a", tmp_path) == tmp_path / "a"
    assert resolve_bundle(tmp_path / "b") == tmp_path / "b"
    with pytest.raises(BundleError, match="available: a, b"):
        resolve_bundle("c", tmp_path)
    assert check_bundle(tmp_path / "a")["decoder"] == "inject"


def _damage(bundle: Path, what: str) -> None:
    cfg = json.loads((bundle / "config.json").read_text())
    if what == "vocab":
        (bundle / "vocab.json").unlink()
    elif what == "format":
        (bundle / "config.json").write_text(json.dumps({**cfg, "format": "other"}))
    elif what == "size":
        cfg["decoder_config"]["vocab_size"] += 1
        (bundle / "config.json").write_text(json.dumps(cfg))
    elif what == "weights":
        save_file({"nothing": torch.zeros(1)}, str(bundle / "decoder.safetensors"))
    elif what == "block":
        (bundle / "encoder_block.safetensors").write_bytes(b"not the recorded block")
        cfg[BLOCK_KEY] = {"block": "layer4", "file": "encoder_block.safetensors", "sha256": SHA}
        (bundle / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "what, message",
    [
        ("vocab", "missing vocab.json"),
        ("format", "is not a captioning-bundle config"),
        ("size", "vocab.json has"),
        ("weights", "does not fit its config"),
        ("block", "the fine-tuned block was changed or damaged"),
    ],
)
def test_a_damaged_bundle_is_refused_with_the_reason(tmp_path, what, message):
    make_bundle(tmp_path / "m")
    _damage(tmp_path / "m", what)
    with pytest.raises(BundleError, match=message):
        open_bundle(tmp_path / "m")


def test_a_record_replaces_only_the_record_of_the_same_setting(tmp_path):
    make_bundle(tmp_path / "m")
    beam3 = Setting("dev", DecodeConfig(beam_size=3), "fp32", "torch")
    beam5 = Setting("dev", DecodeConfig(beam_size=5), "fp32", "torch")
    _, replaced = add_record(tmp_path / "m", beam3, 8, {"cider": 10.0}, None)
    assert not replaced
    add_record(tmp_path / "m", beam5, 8, {"cider": 12.0}, None)
    _, replaced = add_record(tmp_path / "m", beam3, 8, {"cider": 11.0}, None)
    records = read_records(tmp_path / "m")
    assert replaced and len(records) == 2  # re-running a setting never doubles a row
    by_beam = {r["decoding"]["beam_size"]: r for r in records}
    assert by_beam[3]["metrics"]["cider"] == 11.0 and by_beam[5]["metrics"]["cider"] == 12.0
    assert by_beam[3]["default"] and not by_beam[5]["default"]  # the bundle decodes at beam 3


def test_changing_the_default_decoding_moves_the_default_record(tmp_path):
    make_bundle(tmp_path / "m")
    for beam in (3, 5):
        setting = Setting("dev", DecodeConfig(beam_size=beam), "fp32", "torch")
        add_record(tmp_path / "m", setting, 8, {"cider": float(beam)}, None)
    set_decode_defaults(tmp_path / "m", chosen_by="dev CIDEr-D", beam_size=5)
    assert read_config(tmp_path / "m")[DECODING_CHOSEN_KEY] == "dev CIDEr-D"
    defaults = [r["decoding"]["beam_size"] for r in read_records(tmp_path / "m") if r["default"]]
    assert defaults == [5]
    set_decode_defaults(tmp_path / "m", beam_size=3)  # by hand: no longer chosen on dev
    assert DECODING_CHOSEN_KEY not in read_config(tmp_path / "m")
    with pytest.raises(TypeError):
        set_decode_defaults(tmp_path / "m", beams=3)


def test_a_metrics_file_of_another_kind_is_refused(tmp_path):
    make_bundle(tmp_path / "m")
    (tmp_path / "m" / "metrics.json").write_text(json.dumps({"test": {"beam5": {}}}))
    with pytest.raises(BundleError, match="is not a captioning-metrics file"):
        read_records(tmp_path / "m")
