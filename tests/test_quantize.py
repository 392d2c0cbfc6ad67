"""int8 on OpenVINO: the calibration sets, a quantised encoder, int8 decoder-step weights."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from captioning.core.files import sha256_file
from captioning.core.machine import Precision
from captioning.core.settings import DATA_ENV
from captioning.models.decoders import DecoderConfig, build_decoder
from captioning.models.decoding import DecodeConfig, decode
from captioning.runtime import decoders as rt_dec
from captioning.runtime import encoders as rt_enc
from captioning.runtime import openvino as ov
from captioning.runtime import quantize as q
from tests.test_runtime import count_conversions, needs_openvino, tiny_encoder

needs_nncf = pytest.mark.skipif(q.nncf_version() is None, reason="needs nncf")


def _quantised(xml: str) -> bool:
    """Whether an IR holds 8-bit weights or fake-quantise nodes."""
    return 'element_type="i8"' in xml or 'element_type="u8"' in xml or "FakeQuantize" in xml


def test_the_recorded_calibration_set_is_300_named_photos_with_a_stable_digest(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    names = q.CALIBRATION_LIST.read_text().split()
    assert len(names) == len(set(names)) == 300
    train, samples = q.calibration_sets()
    assert train.name == q.TRAIN_SET and samples.name == q.SAMPLES_SET
    assert train.digest == hashlib.sha256("\n".join(names).encode()).hexdigest()
    assert train.key.startswith("flickr8k-train-") and train.precision_tag == ""
    assert train.sources() == ()  # no data set here: the samples' set stands in
    assert len(samples.sources()) >= 1


def test_the_calibration_photos_are_train_photos_never_dev_or_test(flickr8k_dir):
    from captioning.data import load_dataset

    ds = load_dataset(flickr8k_dir)
    train = q.calibration_sets(flickr8k_dir)[0]
    names = {p.name for p in train.sources()}
    assert len(names) == 300 and names <= set(ds.splits["train"])
    assert not names & (set(ds.splits["dev"]) | set(ds.splits["test"]))


def test_the_synthetic_set_is_seeded_pictures_of_the_samples(monkeypatch):
    samples = q.calibration_sets()[1]
    first = list(itertools.islice(samples.pixels(), 3))
    again = list(itertools.islice(samples.pixels(), 3))
    assert samples.size() == q.SYNTHETIC_SIZE and samples.precision_tag == "samples"
    for a, b in zip(first, again, strict=True):
        assert a.shape == (3, 224, 224) and 0.0 <= float(a.min()) <= float(a.max()) <= 1.0
        torch.testing.assert_close(a, b)
    assert not torch.equal(first[0], first[1])


def test_a_compile_key_names_its_calibration_set_and_nncf():
    plain = ov.CompileKey("encoder-x", "a" * 64, "bf16", "2026.4.1")
    int8 = ov.CompileKey("encoder-x", "a" * 64, "int8", "2026.4.1", "samples-0123456789ab", "3.4")
    assert "calibration" not in plain.manifest() and "samples-0123456789ab" in int8.dirname
    assert int8.manifest()["nncf"] == "3.4" and int8.dirname != plain.dirname


def test_int8_on_an_explicit_torch_runtime_is_refused():
    with pytest.raises(ValueError, match="int8 runs on OpenVINO"):
        rt_enc.load_encoder("resnet50", "int8", "torch")


@pytest.mark.slow
@needs_openvino
@needs_nncf
def test_an_int8_encoder_calibrated_on_the_samples_is_close_to_fp32_and_cached(
    monkeypatch, tmp_path
):
    monkeypatch.delenv(DATA_ENV, raising=False)
    enc = tiny_encoder(tmp_path, 0)

    def compile_int8():
        return rt_enc.openvino_encoder(
            replace(enc, precision=Precision("int8")),
            fp32_model=lambda: enc.model,
            input_size=224,
            cache_root=tmp_path / "cache",
        )

    engine = compile_int8()
    assert engine.precision.label == "int8-samples"
    assert engine.key.calibration.startswith("samples-") and engine.key.nncf == q.nncf_version()
    assert _quantised(
        (tmp_path / "cache" / "openvino" / engine.key.dirname / "model.xml").read_text()
    )
    x = torch.rand(4, 3, 224, 224)
    with torch.inference_mode():
        want = enc.model(x).grid.flatten(1)
    got = engine.encode(x).grid.flatten(1)
    assert float(torch.nn.functional.cosine_similarity(want, got).min()) > 0.98
    calls = count_conversions(monkeypatch)
    compile_int8()  # the next load reads the quantised model from the cache
    assert calls == []


@needs_openvino
@needs_nncf
def test_int8_step_weights_keep_the_log_probs_and_the_beam(tmp_path):
    torch.manual_seed(0)
    cfg = DecoderConfig(kind="attention", vocab_size=40, feat_dim=32, embed_dim=16,
                        hidden_dim=64, attn_dim=32, dropout=0.0)  # fmt: skip
    dec = build_decoder(cfg).eval()
    path = tmp_path / "decoder.safetensors"
    save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, str(path))
    sha = sha256_file(path)
    fast = rt_dec.openvino_decoder(dec, sha, "int8", grid_cells=16, cache_root=tmp_path)
    assert fast.key.precision == "int8" and fast.key.nncf == q.nncf_version()
    assert _quantised((tmp_path / "openvino" / fast.key.dirname / "model.xml").read_text())
    feats = torch.rand(3, 16, 32)
    with torch.inference_mode():
        ctx = dec.context(feats)
        state = dec.init_state(ctx)
        word = torch.tensor([1, 5, 7])
        want, got = dec.step(ctx, state, word)[0], fast.step(ctx, state, word)[0]
    assert float((want - got).abs().max()) < 0.05  # log-probs
    assert torch.equal(want.argmax(1), got.argmax(1))
    beam = DecodeConfig(beam_size=3, max_len=6)
    ref, out = decode(dec, feats, beam), decode(fast, feats, beam)
    assert [nb[0].tokens for nb in out] == [nb[0].tokens for nb in ref]


def test_a_precision_choice_names_the_encoders_and_the_steps():
    from captioning.bundle.auto import parse_label
    from captioning.core.machine import resolve_precision, split_precision

    assert split_precision("int8") == ("int8", "int8")
    assert split_precision("bf16-int8") == ("bf16", "int8")
    assert split_precision("bf16") == ("bf16", "fp32")
    assert resolve_precision("bf16-int8") == resolve_precision("bf16")  # the encoder's part
    assert parse_label("int8-samples") == (Precision("int8", calibration="samples"), "int8")
    assert parse_label("bf16-int8") == (resolve_precision("bf16"), "int8")
    with pytest.raises(ValueError, match="int8 decoder weights run on OpenVINO"):
        rt_dec.torch_step("int8", "torch")
    assert rt_dec.torch_step("int8", "auto") == "fp32"  # no OpenVINO here: the reference step
