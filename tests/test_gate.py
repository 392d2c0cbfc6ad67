"""The quality gate: verdicts read from a bundle's dev records, and what ``auto`` runs at."""

from __future__ import annotations

from pathlib import Path

import pytest

from captioning.bundle.auto import bundle_precision, choose_precision
from captioning.bundle.format import open_bundle
from captioning.bundle.gate import BLEU4_MARGIN, CIDER_MARGIN, admissible_precisions, verdicts
from captioning.bundle.records import Setting, add_record, read_records
from captioning.core.machine import Precision, resolve_precision
from captioning.inference.calibrate import format_verdicts
from captioning.models.decoding import DecodeConfig
from tests.test_bundle_format import make_bundle

REF = {"cider": 60.0, "bleu4": 24.0, "repeat_trigram": 0.0}


def record(path: Path, precision: str, runtime: str, split="dev", limit=0, beam=None, **m):
    """Record an evaluation of ``precision`` on ``runtime`` into the bundle at ``path``."""
    decoding = DecodeConfig(beam_size=beam) if beam else DecodeConfig()
    setting = Setting(split, decoding, precision, runtime, limit)
    add_record(path, setting, 1000, {**REF, **m}, None)


@pytest.fixture
def bundle(tmp_path):
    make_bundle(tmp_path / "b")
    path = tmp_path / "b"
    record(path, "fp32", "torch")
    return path


def test_a_precision_within_both_margins_is_admissible_and_one_beyond_is_not(bundle):
    record(bundle, "int8", "openvino", cider=60.0 - CIDER_MARGIN, bleu4=24.0 - BLEU4_MARGIN)
    record(bundle, "bf16", "openvino", cider=60.0 - CIDER_MARGIN - 0.01)
    record(bundle, "fp32", "openvino", bleu4=24.0 - BLEU4_MARGIN - 0.01)
    cfg = open_bundle(bundle).config
    got = {v.precision: v for v in verdicts(read_records(bundle), cfg)}
    assert set(got) == {"int8", "bf16", "fp32"}
    assert got["int8"].admissible
    assert not got["bf16"].admissible and "CIDEr-D" in got["bf16"].reasons[0]
    assert not got["fp32"].admissible and "BLEU-4" in got["fp32"].reasons[0]
    table = format_verdicts("b", list(got.values()))
    assert "admissible" in table and "rejected: CIDEr-D" in table


def test_a_repeated_trigram_rejects_a_precision_however_well_it_scores(bundle):
    record(bundle, "int8", "openvino", cider=70.0, bleu4=30.0, repeat_trigram=0.1)
    cfg = open_bundle(bundle).config
    (v,) = verdicts(read_records(bundle), cfg)
    assert not v.admissible and "trigram" in v.reasons[0]


def test_only_full_dev_records_at_the_default_decoding_on_openvino_are_judged(bundle):
    record(bundle, "int8", "openvino", split="test")
    record(bundle, "int8", "openvino", limit=50)
    record(bundle, "int8", "openvino", beam=7)
    record(bundle, "int8", "openvino+torch")  # the step fell back to torch: not the gated path
    cfg = open_bundle(bundle).config
    assert verdicts(read_records(bundle), cfg) == []


def test_without_the_fp32_torch_reference_nothing_is_admissible(tmp_path):
    make_bundle(tmp_path / "b")
    record(tmp_path / "b", "int8", "openvino")
    b = open_bundle(tmp_path / "b")
    assert verdicts(read_records(b.path), b.config) == []
    assert choose_precision(b, "int8") is None


def test_auto_picks_the_fastest_admissible_precision(bundle):
    record(bundle, "bf16", "openvino")
    record(bundle, "fp32", "openvino")
    record(bundle, "int8", "openvino", cider=59.8)
    record(bundle, "int8-samples", "openvino", cider=59.9)
    record(bundle, "bf16-int8", "openvino", cider=59.9)
    b = open_bundle(bundle)
    assert admissible_precisions(read_records(bundle), b.config) == [
        "int8",
        "int8-samples",
        "bf16-int8",
        "bf16",
        "fp32",
    ]
    assert choose_precision(b, "int8") == "int8"
    # without the recorded calibration photos, the int8 this machine would build is another one
    assert choose_precision(b, "int8-samples") == "int8-samples"
    assert bundle_precision(b, "auto", "openvino")[0].dtype == "int8"


def test_a_rejected_int8_falls_back_to_the_next_admissible_precision(bundle):
    record(bundle, "int8", "openvino", cider=50.0)
    record(bundle, "bf16", "openvino", bleu4=10.0)
    record(bundle, "fp32", "openvino")
    b = open_bundle(bundle)
    assert choose_precision(b, "int8") == "fp32"


def test_auto_without_records_and_explicit_precisions_are_left_alone(tmp_path):
    make_bundle(tmp_path / "b")
    b = open_bundle(tmp_path / "b")
    assert bundle_precision(b, "auto", "openvino") == (resolve_precision("auto"), "fp32")
    assert bundle_precision(b, "auto", "torch") == (resolve_precision("auto"), "fp32")
    assert bundle_precision(b, "fp32", "openvino") == (resolve_precision("fp32"), "fp32")
    assert bundle_precision(b, "int8", "openvino") == (Precision("int8"), "int8")
    assert bundle_precision(b, "bf16-int8", "openvino") == (resolve_precision("bf16"), "int8")


def test_tables_show_the_record_of_the_setting_auto_runs_at(bundle):
    record(bundle, "bf16+cl", "torch", split="test")
    record(bundle, "int8", "openvino", split="test")
    record(bundle, "fp32", "torch", split="test")  # the newest: not what auto runs
    record(bundle, "int8", "openvino", cider=59.9)  # dev: admissible
    defaults = {
        (r["split"], r["precision"], r["runtime"]) for r in read_records(bundle) if r["default"]
    }
    assert defaults == {("test", "int8", "openvino"), ("dev", "int8", "openvino")}
    record(bundle, "int8", "openvino", cider=50.0)  # re-judged on dev: rejected
    defaults = {
        (r["split"], r["precision"], r["runtime"]) for r in read_records(bundle) if r["default"]
    }
    assert ("test", "int8", "openvino") not in defaults


@pytest.mark.slow
def test_calibrate_records_the_reference_and_each_precision_and_auto_follows(
    tiny_world, tmp_path, capsys
):
    import shutil

    from captioning.cli import main
    from captioning.inference.captioner import Captioner

    path = tmp_path / "resnet50-inject"
    shutil.copytree(tiny_world.models / "resnet50-inject", path)
    argv = ["calibrate", "--model", str(path), "--data", str(tiny_world.data)]
    argv += ["--cache", str(tiny_world.cache), "--precisions", "bf16", "fp32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reference fp32 torch" in out
    b = open_bundle(path)
    got = {v.precision: v for v in verdicts(read_records(path), b.config)}
    assert set(got) == {"bf16", "fp32"}
    assert all(("admissible" if v.admissible else "rejected") in out for v in got.values())
    ok = admissible_precisions(read_records(path), b.config)
    cap = Captioner.load(path)
    want = ok[0] if ok else resolve_precision("auto").label.removesuffix("+cl")
    assert (cap.runtime, cap.precision_label) == ("openvino", want)
    stamps = [r["recorded"] for r in read_records(path)]
    assert main(argv) == 0  # every setting is recorded: nothing is evaluated again
    assert "is recorded" in capsys.readouterr().out
    assert [r["recorded"] for r in read_records(path)] == stamps
