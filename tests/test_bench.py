"""Benchmarks: the precision report, settings, noise flags, ratios, a real run of every setting
side by side with the yardstick, and bench.json read back (versions 3 and 2)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image

from captioning.bundle import latency
from captioning.bundle.catalog import list_bundles
from captioning.bundle.export import export_bundle
from captioning.cli.bench import setting_arg
from captioning.core.machine import cpu_description
from captioning.data.vocab import Vocabulary
from captioning.inference import bench as B
from captioning.inference.captioner import Captioner
from captioning.models.decoders import DecoderConfig, build_decoder
from captioning.models.encoders import weights_sha256
from captioning.runtime.openvino import openvino_module
from captioning.training.train import TrainConfig

CAPTIONS = ["a dog runs on the grass", "a man rides a bike", "two dogs play in the water"]


@pytest.mark.slow
def test_bf16_features_stay_close_to_fp32():
    imgs = [Image.fromarray(getattr(skimage.data, n)()) for n in ("chelsea", "coffee")]
    rep = B.precision_report("resnet50", imgs, batch=2)
    assert rep["images"] == 2 and rep["fp32_images_per_s"] > 0 and rep["bf16_images_per_s"] > 0
    assert rep["grid_cosine_min"] > 0.97
    assert 0 < rep["grid_rel_error_mean"] < 0.25


# ---------------------------------------------------------------- settings


def test_the_default_plan_is_torch_and_four_openvino_precisions():
    wanted, side_by_side = B.plan()
    assert side_by_side and [s.name for s in wanted] == [
        "torch auto",
        "openvino fp32",
        "openvino bf16",
        "openvino bf16-int8",
        "openvino int8",
    ]
    assert B.Setting.parse("openvino-bf16-int8") == B.Setting("openvino", "bf16-int8")
    assert B.plan("openvino", "int8") == ([B.Setting("openvino", "int8")], False)
    assert B.plan("torch") == ([B.Setting("torch", "auto")], False)
    assert B.plan(precision="fp32") == ([B.Setting("auto", "fp32")], False)
    asked = B.plan(settings=["torch", "openvino-int8", B.Setting("openvino", "bf16")])
    ov = [B.Setting("openvino", "int8"), B.Setting("openvino", "bf16")]
    assert asked == ([B.Setting("torch"), *ov], False)


def test_setting_names_parse_or_fail_with_the_choices():
    assert B.Setting.parse("auto") == B.Setting("auto", "auto")
    assert B.Setting.parse("openvino-int8") == B.Setting("openvino", "int8")
    assert B.Setting("auto").is_default and not B.Setting("torch", "fp32").is_default
    assert B.Setting("torch").is_default == (openvino_module() is None)
    with pytest.raises(ValueError, match="RUNTIME one of auto, torch, openvino"):
        B.Setting.parse("tpu-fp32")
    assert setting_arg("openvino-bf16") == "openvino-bf16"
    with pytest.raises(argparse.ArgumentTypeError, match="PRECISION one of"):
        setting_arg("torch-int4")


# ---------------------------------------------------------------- noise, ratios


def _result(p50: float, p90: float, images_per_s: float = 10.0) -> dict:
    stages = {s: {"p50": p50, "p90": p90} for s in B.STAGES}
    return {"beams": {"3": stages}, "folder": {"images_per_s": images_per_s}}


def test_noise_flags_a_wide_spread_and_a_loaded_machine():
    quiet = {"runtimes": {"torch bf16": _result(10.0, 12.0)}}
    assert B.noise(quiet, threads=2, loads=[0.5, 1.9]) == []
    spread = {"runtimes": {"torch bf16": _result(10.0, 12.0), "openvino int8": _result(4.0, 9.0)}}
    (why,) = B.noise(spread, threads=2, loads=[1.0])
    assert why.startswith("openvino int8 beam 3") and "2.25" in why
    (why,) = B.noise(quiet, threads=2, loads=[1.0, 6.5])
    assert "load average 6.5 > 2 threads" in why
    wobbly = {**quiet, "yardstick": {"p50_ms": 50.0, "p90_ms": 90.0}}
    (why,) = B.noise(wobbly, threads=2, loads=[1.0])
    assert why.startswith("yardstick") and "1.80" in why


def test_ratios_are_speedups_over_torch():
    r = B.ratios(_result(30.0, 33.0, 20.0), _result(10.0, 11.0, 80.0))
    assert r["3"] == {s: 3.0 for s in B.STAGES} and r["throughput"] == 4.0
    assert B.vs_yardstick(_result(30.0, 33.0)["beams"], 60.0) == {"3": 0.5}


# ---------------------------------------------------------------- a real run


def make_small_bundle(out: Path) -> Path:
    """A bundle on the real ResNet50 (its weights' sha256) with a tiny random inject decoder."""
    torch.manual_seed(0)
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    dcfg = DecoderConfig(
        kind="inject", vocab_size=len(vocab), feat_dim=2048, embed_dim=8, hidden_dim=8
    )
    export_bundle(
        out,
        build_decoder(dcfg),
        vocab,
        cfg=TrainConfig(encoder="resnet50", decoder="inject", precision="fp32"),
        dcfg=dcfg,
        history=[{"epoch": 1, "cider": 1.0}],
        best_epoch=1,
        commit=None,
        encoder_sha256=weights_sha256("resnet50"),
        select_metric="cider",
    )
    return out


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    return make_small_bundle(tmp_path_factory.mktemp("bench") / "small")


def _check_figures(res: dict) -> None:
    """Every entry's stages, folder rate and ratio to the yardstick, and the headline."""
    ys = res["yardstick"]
    assert ys["model"] == "torchvision resnet50 fp32, batch 1" and ys["p50_ms"] > 0
    for r in res["runtimes"].values():
        for beam, stages in r["beams"].items():
            assert set(stages) == set(B.STAGES)
            tot = stages["total_ms"]["p50"]
            assert tot >= stages["encode_ms"]["p50"] > 0 and tot >= stages["decode_ms"]["p50"]
            assert r["vs_yardstick"][beam] == round(tot / ys["p50_ms"], 2)
        assert r["folder"]["images"] == 2 and r["folder"]["images_per_s"] > 0
    assert isinstance(res["noisy"], bool) and res["noisy"] == bool(res["noise"])
    assert len(res["loadavg"]) == 2 and res["cpu_model"] == cpu_description()


@pytest.mark.slow
def test_bench_measures_every_setting_side_by_side_and_marks_auto(small_bundle):
    res = B.bench(small_bundle, beams=(3,), runs=1, warmup=0, folder_images=2, batch_size=2)
    assert res["version"] == 3
    asked = ["torch bf16" if cpu_description()["bf16_flags"] else "torch fp32"]
    asked += [f"openvino {p}" for p in ("fp32", "bf16", "bf16-int8", "int8")]
    skipped = [note.split(":")[0] for note in res["skipped"]]
    assert sorted([*res["runtimes"], *skipped]) == sorted(asked)  # each measured or skipped
    if openvino_module() is not None:
        assert "openvino fp32" in res["runtimes"] and "openvino bf16" in res["runtimes"]
    (auto,) = [r for r in res["runtimes"].values() if r["auto"]]
    cap = Captioner.load(small_bundle)  # the defaults: precision and runtime auto
    assert (auto["runtime"], auto["precision"]) == (cap.runtime, cap.precision_label)
    assert (res["runtime"], res["precision"], res["beams"]) == (
        auto["runtime"],
        auto["precision"],
        auto["beams"],
    )
    assert res["throughput_img_s"] == auto["folder"]["images_per_s"]
    _check_figures(res)
    others = [k for k in res["runtimes"] if not k.startswith("torch")]
    assert sorted(res["ratios"]) == sorted(others)

    path = B.save_bench(small_bundle, res)
    assert path == small_bundle / "bench.json" and latency.read_bench(small_bundle) == res
    (info,) = list_bundles(small_bundle.parent)
    s = latency.bench_summary(info)
    assert s.yardstick_p50 == res["yardstick"]["p50_ms"]
    assert s.vs_yardstick == auto["vs_yardstick"]["3"]
    md = latency.latency_markdown([info]).splitlines()
    assert md[0] == f"**{latency.machine_label(res)}, {res['threads']} threads**"
    assert md[2].endswith(f"| {latency.YARDSTICK_HEAD} |")
    rows = md[4 : 4 + len(res["runtimes"])]
    assert sum("(auto) |" in row for row in rows) == 1
    assert f"{auto['runtime']} {auto['precision']} (auto)" in "\n".join(rows)
    assert md[-1].startswith("Yardstick (torchvision ResNet50 fp32, batch 1) p50 in each run")
    text = B.format_bench(res).splitlines()
    assert text[0].startswith(f"small on {cpu_description()['model']}")
    assert sum(line.split("  ")[0].endswith("(auto)") for line in text) == 1
    assert any(line.startswith("yardstick (torchvision resnet50") for line in text)


@pytest.mark.slow
def test_bench_measures_only_the_settings_asked_and_skips_what_cannot_load(small_bundle):
    odd = B.Setting("openvino", "int4")  # no such precision: its load fails, the run goes on
    res = B.bench(
        small_bundle,
        settings=["torch-fp32", odd],
        beams=(1,),
        runs=1,
        warmup=0,
        folder_images=2,
        batch_size=2,
    )
    assert list(res["runtimes"]) == ["torch fp32"] and res["ratios"] is None
    (note,) = res["skipped"]
    assert note.startswith("openvino int4: ") and "unknown precision" in note and "\n" not in note
    assert not res["runtimes"]["torch fp32"]["auto"]  # the defaults were not asked for
    assert res["runtime"] == "torch" and res["precision"] == "fp32"
    _check_figures(res)
    assert "skipped openvino int4: " in B.format_bench(res)


# ---------------------------------------------------------------- version 2 records


def test_a_version_2_record_still_parses(tmp_path):
    bundle = make_small_bundle(tmp_path / "m")
    beams = {b: {k: {"p50": 10.0 * int(b), "p90": 12.0 * int(b)} for k in B.STAGES} for b in "135"}
    v2 = {
        "version": 2, "threads": 2, "runtime": "openvino", "precision": "bf16-openvino",
        "beams": beams, "throughput_img_s": 9.5, "throughput_beam": 3, "folder": "samples",
        "cpu_model": {"model": "Xeon", "bf16_flags": ["amx_bf16"]},
        "runtimes": {
            "torch": {"runtime": "torch", "precision": "bf16+cl", "beams": beams,
                      "folder": {"images": 64, "images_per_s": 7.5}},
            "openvino": {"runtime": "openvino", "precision": "bf16-openvino", "beams": beams,
                         "folder": {"images": 64, "images_per_s": 9.5}},
        },
    }  # fmt: skip
    (bundle / "bench.json").write_text(json.dumps(v2))
    (info,) = list_bundles(tmp_path)
    assert list(latency.bench_settings(v2)) == ["torch", "openvino"]
    s = latency.bench_summary(info)
    assert (s.runtime, s.precision, s.images_per_s) == ("openvino", "bf16-openvino", 9.5)
    assert s.total_ms[3] == (30.0, 36.0) and (s.yardstick_p50, s.vs_yardstick) == (None, None)
    md = latency.latency_markdown([info]).splitlines()
    assert md[0] == "**Xeon (amx_bf16), 2 threads**" and md[2].endswith("| folder images/s |")
    assert md[4].startswith("| m | torch bf16+cl | 30.0 | 10.0 / 30.0 / 50.0 |")
    assert md[5].startswith("| m | openvino bf16-openvino |") and len(md) == 6
    assert "(auto)" not in "\n".join(md)  # version 2 records do not flag a setting
