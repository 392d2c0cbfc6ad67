"""Runtimes: selection, OpenVINO against the torch reference, the compile cache and fallbacks.

Small encoders and decoders are made in the test; the compile cache lives in tmp_path. The
Flickr8k test reuses compiled encoders from the caller's cache (copied into tmp_path) and skips
without them.
"""

from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from captioning.core import machine, paths
from captioning.core.files import read_json, sha256_file
from captioning.core.machine import Precision, cpu_has_fast_bf16, resolve_precision
from captioning.models.decoders import DecoderConfig, build_decoder
from captioning.models.decoding import DecodeConfig, decode
from captioning.models.encoders import EncoderOutput, EncoderSpec, LoadedEncoder
from captioning.runtime import decoders as rt_dec
from captioning.runtime import encoders as rt_enc
from captioning.runtime import openvino as ov

SIDE = 32  # tiny encoders take 32x32 images and give a 4x4 grid of 8 channels
needs_openvino = pytest.mark.skipif(ov.openvino_module() is None, reason="needs openvino")


class TinyEncoder(nn.Module):
    """Two convolutions with the encoder interface (feature_map, forward -> EncoderOutput)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=4, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
        )

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,32,32] -> [B,8,4,4]
        return self.body(x)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        grid = self.feature_map(x).flatten(2).transpose(1, 2)  # [B, 16, 8]
        return EncoderOutput(pooled=grid.mean(1), grid=grid)


SPEC = EncoderSpec("tiny", "tiny", "converted", "caffe", 8, 8, 16, False)


def tiny_encoder(tmp_path, seed: int, precision: str = "fp32") -> LoadedEncoder:
    """A tiny encoder whose sha256 is that of its own weights file (as for shipped encoders)."""
    model = TinyEncoder(seed).eval()
    path = tmp_path / f"tiny-{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return LoadedEncoder(model, SPEC, sha256_file(path), Precision(precision))


def compile_tiny(enc: LoadedEncoder, tmp_path):
    return rt_enc.openvino_encoder(
        enc, fp32_model=lambda: enc.model, input_size=SIDE, cache_root=tmp_path / "cache"
    )


def count_conversions(monkeypatch) -> list:
    calls = []
    real = ov._convert

    def counting(*args, **kwargs):
        calls.append(args[2].name)  # the entry directory
        return real(*args, **kwargs)

    monkeypatch.setattr(ov, "_convert", counting)
    return calls


def test_resolve_runtime():
    assert ov.resolve_runtime("torch") == "torch"
    want = "openvino" if ov.openvino_module() is not None else "torch"
    assert ov.resolve_runtime("auto") == want
    with pytest.raises(ValueError, match="unknown runtime"):
        ov.resolve_runtime("onnx")


def test_openvino_absent_falls_back_to_torch(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    assert ov.openvino_module() is None
    assert ov.resolve_runtime("auto") == "torch"
    assert capsys.readouterr().err == ""  # auto picks torch without a word
    enc = tiny_encoder(tmp_path, 0)
    out = rt_enc.accelerate_encoder(enc, "openvino")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "openvino is not installed" in err[0]
    assert out.engine is None and out.runtime == "torch" and out.label == "fp32"
    x = torch.rand(2, 3, SIDE, SIDE)
    assert torch.equal(out.encode(x).grid, enc.encode(x).grid)


@needs_openvino
def test_encoder_matches_torch_with_dynamic_batch_and_is_cached(monkeypatch, tmp_path):
    calls = count_conversions(monkeypatch)
    enc = tiny_encoder(tmp_path, 0)
    engine = compile_tiny(enc, tmp_path)
    assert len(calls) == 1 and engine.precision_hint == "f32"
    for batch in (1, 3):  # one compiled model serves every batch size
        x = torch.rand(batch, 3, SIDE, SIDE)
        ref, got = enc.encode(x), engine.encode(x)
        assert got.grid.shape == (batch, 16, 8) and got.pooled.shape == (batch, 8)
        torch.testing.assert_close(got.grid, ref.grid, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.pooled, ref.pooled, atol=1e-5, rtol=1e-4)
    entry = paths.openvino_cache_dir(tmp_path / "cache") / engine.key.dirname
    manifest = read_json(entry / "manifest.json")
    assert manifest["weights_sha256"] == enc.sha256 and manifest["precision"] == "fp32"
    assert manifest["openvino"] == ov.openvino_version()
    compile_tiny(enc, tmp_path)  # a second load reads the cache
    assert len(calls) == 1
    # the LoadedEncoder interface: encode goes to the engine, labels say so
    fast = rt_enc.accelerate_encoder(enc, "openvino", fp32_model=lambda: enc.model,
                                      input_size=SIDE, cache_root=tmp_path / "cache")  # fmt: skip
    assert fast.runtime == "openvino" and fast.label == "fp32-openvino" and len(calls) == 1
    x = torch.rand(2, 3, SIDE, SIDE)
    torch.testing.assert_close(fast.encode(x).grid, enc.encode(x).grid, atol=1e-5, rtol=1e-4)


@needs_openvino
def test_threads_are_pinned_only_when_the_process_uses_every_core(monkeypatch, tmp_path):
    # Each process pins from core 0 on: two one-thread processes on 2 cores would share core 0.
    monkeypatch.setattr(machine, "usable_cpus", lambda: 2)
    assert machine.pin_threads(2) and machine.pin_threads(4) and not machine.pin_threads(1)
    enc = tiny_encoder(tmp_path, 0)
    for threads, pinned in ((1, False), (2, True)):
        engine = rt_enc.openvino_encoder(
            enc, fp32_model=lambda: enc.model, input_size=SIDE, threads=threads,
            cache_root=tmp_path / "cache",
        )  # fmt: skip
        assert engine.compiled.get_property("INFERENCE_NUM_THREADS") == threads
        assert engine.compiled.get_property("ENABLE_CPU_PINNING") is pinned


@needs_openvino
def test_a_process_of_openvino_captioners_hands_the_cores_to_openvino(tmp_path):
    from captioning.inference.captioner import dedicate_cores

    torch.set_num_threads(2)
    enc = tiny_encoder(tmp_path, 0)
    cap = SimpleNamespace(runtime="openvino+torch")  # the step on torch: torch keeps its threads
    dedicate_cores(cap)
    assert torch.get_num_threads() == 2 and ov.compile_threads() == 2
    dedicate_cores(SimpleNamespace(runtime="openvino"))
    assert torch.get_num_threads() == 1 and ov.compile_threads() == 2
    engine = compile_tiny(enc, tmp_path)  # a model compiled later still gets both threads
    assert engine.compiled.get_property("INFERENCE_NUM_THREADS") == 2


@needs_openvino
def test_weights_change_invalidates_the_cache(monkeypatch, tmp_path):
    calls = count_conversions(monkeypatch)
    old, new = tiny_encoder(tmp_path, 0), tiny_encoder(tmp_path, 1)
    assert old.sha256 != new.sha256
    e_old, e_new = compile_tiny(old, tmp_path), compile_tiny(new, tmp_path)
    assert len(calls) == 2 and e_old.key.dirname != e_new.key.dirname
    x = torch.rand(2, 3, SIDE, SIDE)
    torch.testing.assert_close(e_new.encode(x).grid, new.encode(x).grid, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(e_new.encode(x).grid, old.encode(x).grid, atol=1e-3)
    # an entry whose manifest does not match its key is converted again, not trusted
    entry = paths.openvino_cache_dir(tmp_path / "cache") / e_new.key.dirname
    bad = {**read_json(entry / "manifest.json"), "weights_sha256": old.sha256}
    (entry / "manifest.json").write_text(json.dumps(bad))
    compile_tiny(new, tmp_path)
    assert len(calls) == 3 and read_json(entry / "manifest.json")["weights_sha256"] == new.sha256


@needs_openvino
def test_damaged_cache_entry_is_rebuilt(monkeypatch, tmp_path):
    calls = count_conversions(monkeypatch)
    enc = tiny_encoder(tmp_path, 0)
    engine = compile_tiny(enc, tmp_path)
    entry = paths.openvino_cache_dir(tmp_path / "cache") / engine.key.dirname
    shutil.rmtree(entry / "compiled", ignore_errors=True)
    (entry / "model.xml").write_text("<not a model")
    engine = compile_tiny(enc, tmp_path)
    assert len(calls) == 2
    x = torch.rand(1, 3, SIDE, SIDE)
    torch.testing.assert_close(engine.encode(x).grid, enc.encode(x).grid, atol=1e-5, rtol=1e-4)


class FailingCore:
    def compile_model(self, *args, **kwargs):
        raise RuntimeError("CPU plugin refused the model\nsecond line of detail")


@needs_openvino
def test_compile_failure_falls_back_to_torch_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ov, "_core", FailingCore)
    enc = tiny_encoder(tmp_path, 0)
    out = rt_enc.accelerate_encoder(enc, "openvino", fp32_model=lambda: enc.model,
                                     input_size=SIDE, cache_root=tmp_path / "cache")  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert out.engine is None and out.runtime == "torch"
    assert len(err) == 1 and "could not compile the tiny encoder" in err[0]
    assert "running on torch" in err[0] and "second line" not in err[0]
    dec = build_decoder(DecoderConfig(kind="inject", vocab_size=12, feat_dim=8, embed_dim=8,
                                      hidden_dim=16))  # fmt: skip
    got = rt_dec.accelerate_decoder(dec, "0" * 64, "fp32", "openvino", cache_root=tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert got is dec and len(err) == 1 and "decoder step" in err[0]


@needs_openvino
def test_cpu_without_bf16_compiles_fp32(monkeypatch, tmp_path):
    monkeypatch.setattr("captioning.core.machine.cpu_has_fast_bf16", lambda: False)
    prec = resolve_precision("auto")
    assert prec.dtype == "fp32"
    enc = tiny_encoder(tmp_path, 0, prec.dtype)
    engine = compile_tiny(enc, tmp_path)
    assert engine.key.precision == "fp32" and "-fp32-" in engine.key.dirname
    assert engine.precision_hint == "f32"


@needs_openvino
@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no native bf16")
def test_cpu_with_bf16_compiles_bf16_close_to_fp32(tmp_path):
    prec = resolve_precision("auto")
    assert prec.dtype == "bf16"
    ref = tiny_encoder(tmp_path, 0)
    enc = LoadedEncoder(ref.model, SPEC, ref.sha256, prec)
    engine = compile_tiny(enc, tmp_path)
    assert engine.precision_hint == "bf16" and "-bf16-" in engine.key.dirname
    x = torch.rand(4, 3, SIDE, SIDE)
    cos = torch.cosine_similarity(engine.encode(x).grid.flatten(1), ref.encode(x).grid.flatten(1))
    assert float(cos.min()) > 0.999


@needs_openvino
@pytest.mark.parametrize("name", ["inject", "inject-par", "merge", "attention", "updown"])
def test_decoder_step_matches_torch(name, tmp_path):
    torch.manual_seed(0)
    kind, _, mode = name.partition("-")
    mode = mode or "init"
    cfg = DecoderConfig(kind=kind, vocab_size=12, feat_dim=8, embed_dim=6, hidden_dim=16,
                        attn_dim=8, merge_dim=8, dropout=0.0, inject_mode=mode)  # fmt: skip
    dec = build_decoder(cfg).eval()
    path = tmp_path / "decoder.safetensors"
    save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, str(path))
    fast = rt_dec.openvino_decoder(dec, sha256_file(path), "fp32", grid_cells=16,
                                    cache_root=tmp_path)  # fmt: skip
    assert fast.cfg is dec.cfg and rt_dec.runtime_of(fast) == "openvino"
    feats = torch.rand(3, 16, 8) if cfg.uses_grid else torch.rand(3, 8)
    with torch.inference_mode():
        ctx = dec.context(feats)
        state = dec.init_state(ctx)
        word = torch.tensor([1, 5, 7])
        want, got = dec.step(ctx, state, word), fast.step(ctx, state, word)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)  # log-probs
    assert len(got[1]) == len(want[1]) == (4 if kind == "updown" else 2)
    for g, w in zip(got[1], want[1], strict=True):  # h, c (and the second LSTM's)
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert (got[2] is None) == (want[2] is None)
    beam = DecodeConfig(beam_size=3, max_len=6)
    ref, out = decode(dec, feats, beam), decode(fast, feats, beam)
    assert [[h.tokens for h in nb] for nb in out] == [[h.tokens for h in nb] for nb in ref]


@pytest.mark.slow
@needs_openvino
def test_captioner_runs_on_openvino_or_falls_back(tiny_world, monkeypatch):
    from captioning.data.images import iter_image_files
    from captioning.inference.captioner import Captioner

    bundle = tiny_world.models / "resnet50-attention"
    ref = Captioner.load(bundle, precision="fp32", runtime="torch")
    fast = Captioner.load(bundle, precision="fp32", runtime="openvino")
    assert ref.runtime == "torch" and fast.runtime == "openvino"
    assert fast.encoder.label == "fp32-openvino" and fast.step_decoder is not fast.decoder
    files = iter_image_files([tiny_world.data / "Images"])[:4]
    want = [r.text for r in ref.caption_batch(files, beam_size=3)]
    assert [r.text for r in fast.caption_batch(files, beam_size=3)] == want
    # the next process finds the compiled encoder in the cache and builds no torch model
    again = rt_enc.load_encoder("resnet50", "fp32", "openvino")
    assert again.model is None and again.runtime == "openvino"
    x = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(again.encode(x).grid, fast.encoder.encode(x).grid)
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert Captioner.load(bundle, precision="fp32", runtime="auto").runtime == "torch"


def _user_entry(name: str, sha: str, precision: str):
    """A compiled encoder in the caller's cache (made by any --runtime openvino run), or None."""
    from tests.conftest import CALLER_CACHE

    if not CALLER_CACHE:
        return None
    key = ov.CompileKey(f"encoder-{name}", sha, precision, ov.openvino_version())
    entry = paths.openvino_cache_dir(CALLER_CACHE) / key.dirname
    return entry if ov.entry_ok(entry, key) else None


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_flickr8k_features_match_torch_fp32(name, flickr8k_dir, tmp_path):
    """Accuracy gate: feature cosine to torch fp32 >= 0.999 on dev images (auto precision)."""
    from captioning.data import load_flickr8k
    from captioning.models.encoders import build_encoder, weights_sha256
    from captioning.runtime.pixels import load_pixels

    prec = resolve_precision("auto").dtype
    entry = _user_entry(name, weights_sha256(name), prec)
    if entry is not None:  # reuse the caller's converted model; otherwise convert it here
        shutil.copytree(
            entry, tmp_path / "openvino" / entry.name, ignore=shutil.ignore_patterns("compiled")
        )
    ds = load_flickr8k(flickr8k_dir)
    x = torch.stack([load_pixels(ds.image_path(n)) for n in ds.splits["dev"][:64]])  # [64, 3, H, W]
    ref = build_encoder(name, "fp32").encode(x)
    enc = rt_enc.accelerate_encoder(build_encoder(name, prec), "openvino", cache_root=tmp_path)
    assert enc.runtime == "openvino"
    got = enc.encode(x)
    for a, b in ((got.grid, ref.grid), (got.pooled, ref.pooled)):
        assert float(torch.cosine_similarity(a.flatten(1), b.flatten(1)).min()) >= 0.999
