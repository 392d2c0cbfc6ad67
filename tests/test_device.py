"""``--device auto|cpu|cuda``: resolution, clear errors without CUDA, and the CPU paths.

This machine has no GPU, so the CUDA paths are exercised only where a device can be faked: the
``meta`` device stands in for the GPU to show that models, inputs and tensor factories follow
the requested device.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from captioning import cli
from captioning.core import machine as P
from captioning.core.machine import Precision, device_scope, resolve_device, resolve_precision
from captioning.models.encoders import LoadedEncoder, get_spec
from captioning.runtime.features import FeatureCache
from tests.synthetic import make_tiny_flickr

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def test_cpu_description_names_the_model_and_its_bf16_flags(monkeypatch):
    info = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx512f avx512_bf16 sse\n"
    monkeypatch.setattr("captioning.core.machine._cpuinfo", lambda: info)
    assert P.cpu_description() == {"model": "Test CPU 9000", "bf16_flags": ["avx512_bf16"]}
    assert P.cpu_has_fast_bf16()
    monkeypatch.setattr("captioning.core.machine._cpuinfo", lambda: "flags\t: fpu sse\n")
    assert P.cpu_description() == {"model": "", "bf16_flags": []} and not P.cpu_has_fast_bf16()


@no_cuda
def test_auto_picks_the_cpu_here():
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"


@no_cuda
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="--device cuda: no CUDA device is available") as e:
        resolve_device("cuda")
    assert "--device cpu" in str(e.value) and "\n" not in str(e.value)


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="choose from auto, cpu, cuda"):
        resolve_device("tpu")


@no_cuda
@pytest.mark.parametrize(
    "args",
    [
        ["extract", "--encoder", "resnet50"],
        ["train", "--out", "{tmp}/out"],
        ["evaluate", "--model", "no-such-bundle"],
        ["caption", "--model", "no-such-bundle", "{tmp}/x.jpg"],
        ["batch", "{tmp}", "--model", "no-such-bundle", "--out", "{tmp}/out"],
    ],
    ids=lambda a: a[0],
)
def test_every_command_gives_one_line_for_cuda_without_a_gpu(args, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--device", "cuda"]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda: no CUDA device is available"), err
    assert "\n" not in err
    assert not (tmp_path / "out").exists()


def test_precisions_resolve_on_the_cpu_and_label_the_device():
    for name in ("auto", "fp32", "bf16"):
        p = resolve_precision(name)
        assert p == resolve_precision(name, "cpu") and p.device == "cpu"
        assert p.label in ("fp32", "bf16+cl")
    assert Precision("bf16", True, "cuda").label == "bf16+cl-cuda"
    assert Precision("fp16", True, "cuda:1").label == "fp16+cl-cuda"
    assert Precision("fp16", True, "cuda").torch_dtype == torch.float16


def test_gpu_features_get_their_own_cache(tmp_path):
    spec, sha = get_spec("resnet50"), "ab" * 32
    cpu = LoadedEncoder(None, spec, sha, resolve_precision("bf16"))
    gpu = LoadedEncoder(None, spec, sha, Precision("bf16", True, "cuda"))
    name = FeatureCache.for_encoder(cpu, tmp_path).directory.name
    assert name == f"resnet50-{sha[:12]}-bf16+cl"
    assert FeatureCache.for_encoder(gpu, tmp_path).directory.name == f"{name}-cuda"


def test_models_inputs_and_new_tensors_follow_the_device():
    """``meta`` stands in for a GPU: the same code paths move everything there."""
    p = Precision("fp32", False, "meta")
    assert p.prepare_model(nn.Linear(3, 2)).weight.device.type == "meta"
    assert p.prepare_input(torch.rand(1, 3, 4, 4)).device.type == "meta"
    with device_scope("meta"):
        assert torch.arange(3).device.type == "meta"
        assert torch.full((2,), 1).device.type == "meta"
    with device_scope("cpu"):  # a no-op on the CPU
        assert torch.arange(3).device.type == "cpu"


def test_extract_with_auto_runs_on_the_cpu_into_the_cpu_cache(tmp_path, capsys):
    data = make_tiny_flickr(tmp_path / "flickr", sizes={"train": 2, "dev": 1, "test": 1})
    base = ["extract", "--encoder", "resnet50", "--data", str(data), "--limit", "1"]
    base += ["--cache", str(tmp_path / "cache"), "--precision", "fp32", "--runtime", "torch"]
    assert cli.main([*base, "--device", "auto"]) == 0
    auto = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert auto["device"] == "cpu" and auto["new_images"] == 1
    assert auto["cache"].endswith("-fp32")
    assert cli.main([*base, "--device", "cpu"]) == 0
    cpu = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cpu["cache"] == auto["cache"] and cpu["new_images"] == 0  # the very same cache
