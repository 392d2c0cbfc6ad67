"""Benchmarks: the precision report, noise flags, ratios, and a real torch-vs-OpenVINO run."""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from captioning.core.machine import cpu_description
from captioning.inference import bench as B
from captioning.runtime.openvino import openvino_module

BUNDLE = Path(__file__).resolve().parents[1] / "artifacts" / "models" / "resnet50-inject"


@pytest.mark.slow
def test_bf16_features_stay_close_to_fp32():
    imgs = [Image.fromarray(getattr(skimage.data, n)()) for n in ("chelsea", "coffee")]
    rep = B.precision_report("resnet50", imgs, batch=2)
    assert rep["images"] == 2 and rep["fp32_images_per_s"] > 0 and rep["bf16_images_per_s"] > 0
    assert rep["grid_cosine_min"] > 0.97
    assert 0 < rep["grid_rel_error_mean"] < 0.25


def _result(p50: float, p90: float, images_per_s: float = 10.0) -> dict:
    stages = {s: {"p50": p50, "p90": p90} for s in B.STAGES}
    return {"beams": {"3": stages}, "folder": {"images_per_s": images_per_s}}


def test_noise_flags_a_wide_spread_and_a_loaded_machine():
    quiet = {"runtimes": {"torch": _result(10.0, 12.0)}}
    assert B.noise(quiet, threads=2, loads=[0.5, 1.9]) == []
    spread = {"runtimes": {"torch": _result(10.0, 12.0), "openvino": _result(4.0, 9.0)}}
    (why,) = B.noise(spread, threads=2, loads=[1.0])
    assert why.startswith("openvino beam 3") and "2.25" in why
    (why,) = B.noise(quiet, threads=2, loads=[1.0, 6.5])
    assert "load average 6.5 > 2 threads" in why


def test_ratios_are_openvino_speedups():
    r = B.ratios(_result(30.0, 33.0, 20.0), _result(10.0, 11.0, 80.0))
    assert r["3"] == {s: 3.0 for s in B.STAGES} and r["throughput"] == 4.0


@pytest.mark.slow
@pytest.mark.skipif(not BUNDLE.is_dir(), reason="needs the shipped resnet50-inject bundle")
def test_bench_runs_each_runtime_and_saves(tmp_path):
    from captioning.bundle.reports import read_bench

    both = openvino_module() is not None
    res = B.bench(BUNDLE, runs=2, warmup=1, beams=(3,), folder_images=2, batch_size=2)
    assert set(res["runtimes"]) == ({"torch", "openvino"} if both else {"torch"})
    assert res["runtime"] == ("openvino" if both else "torch")
    for r in res["runtimes"].values():
        for stages in r["beams"].values():
            assert set(stages) == set(B.STAGES)
            tot = stages["total_ms"]["p50"]
            assert tot >= stages["encode_ms"]["p50"] > 0 and tot >= stages["decode_ms"]["p50"]
        assert r["folder"]["images"] == 2 and r["folder"]["images_per_s"] > 0
    assert res["beams"] == res["runtimes"][res["runtime"]]["beams"]  # the headline runtime
    assert (res["ratios"] is not None) == both
    assert isinstance(res["noisy"], bool) and res["noisy"] == bool(res["noise"])
    assert len(res["loadavg"]) == 2
    assert res["cpu_model"] == cpu_description()  # figures compare only on the same CPU
    path = B.save_bench(tmp_path, res)
    assert path == tmp_path / "bench.json" and read_bench(tmp_path) == res
    text = B.format_bench(res)
    assert "folder, torch" in text and ("speed-up of openvino" in text) == both
