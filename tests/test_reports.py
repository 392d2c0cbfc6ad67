"""Records say exactly what made each number; ``reports`` reads them for the CLI and dashboard.

Small real bundles are exported here (a tiny untrained decoder), so every test runs the code that
writes and reads ``config.json``, ``metrics.json``, predictions and the card.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from captioning.bundle.card import card_markdown, write_card
from captioning.bundle.catalog import list_bundles
from captioning.bundle.export import export_bundle
from captioning.bundle.records import Setting, add_record, read_records, set_decode_defaults
from captioning.bundle.reports import (
    comparison_markdown,
    default_result,
    latency_markdown,
    prediction_sets,
    read_bench,
    read_history,
    results,
    results_markdown,
)
from captioning.core.machine import resolve_precision
from captioning.data import CaptionDataset
from captioning.data.flickr8k import KAGGLE_NOTE, OFFICIAL_NOTE
from captioning.data.vocab import Vocabulary
from captioning.inference.evaluate import PREDICTION_FIELDS, write_predictions
from captioning.models.decoders import DecoderConfig, build_decoder
from captioning.models.decoding import DecodeConfig
from captioning.training.train import TrainConfig
from dashboard import tables

SCORES = {"bleu1": 60.0, "bleu2": 40.0, "bleu3": 30.0, "bleu4": 20.0, "meteor": None,
          "rougeL": 45.0, "cider": 50.0}  # fmt: skip


def dataset(root: Path, layout: str = "flickr8k-official") -> CaptionDataset:
    official = layout == "flickr8k-official"
    splits = {"train": ["a.jpg", "b.jpg", "c.jpg"], "dev": ["d.jpg"], "test": ["e.jpg", "f.jpg"]}
    caps = {n: ["a dog runs", "a cat sits"] for s in splits.values() for n in s}
    return CaptionDataset(
        root,
        root,
        layout,
        caps,
        splits,
        split_source="official" if official else "hash",
        split_note=OFFICIAL_NOTE if official else KAGGLE_NOTE,
    )


def make_bundle(root: Path, name: str, *, encoder="resnet50", decoder="inject",
                layout="flickr8k-official",
                precision="auto", beam=3) -> Path:  # fmt: skip
    """A real (untrained, tiny) bundle written by ``export_bundle``."""
    ds = dataset(root, layout)
    vocab = Vocabulary.build((c for cs in ds.captions.values() for c in cs), min_freq=1)
    dcfg = DecoderConfig(kind=decoder, vocab_size=len(vocab), feat_dim=8, embed_dim=8,
                         hidden_dim=8, attn_dim=8, merge_dim=8)  # fmt: skip
    cfg = TrainConfig(encoder=encoder, decoder=decoder, precision=precision)
    out = root / name
    export_bundle(out, build_decoder(dcfg), vocab, cfg=cfg, dcfg=dcfg, history=[{"epoch": 1}],
                  best_epoch=1, commit=None, dataset=ds, encoder_sha256="0" * 64,
                  select_metric="dev_cider")  # fmt: skip
    if beam != 3:
        set_decode_defaults(out, beam_size=beam)
    write_card(out)
    return out


def setting(split="test", beam=3, alpha=0.0, precision="fp32", runtime="torch", limit=0, **kw):
    return Setting(split, DecodeConfig(beam_size=beam, length_alpha=alpha, **kw), precision,
                   runtime, limit)  # fmt: skip


def record(bundle: Path, s: Setting, scores=SCORES, images=("e.jpg", "f.jpg"), bleu=50.0):
    name = s.predictions_name()
    rows = [{"image": i, "caption": "a dog", "logprob": -1.0, "bleu1": bleu, "bleu2": bleu,
             "bleu3": bleu, "bleu4": bleu} for i in images]  # fmt: skip
    write_predictions(bundle / name, rows)
    return add_record(bundle, s, len(images), dict(scores), name)


def info(bundle: Path):
    (b,) = [b for b in list_bundles(bundle.parent) if b.path == bundle]
    return b


# ---------------------------------------------------------------- §3: config and card


def test_config_stores_resolved_precision_runtime_and_data(tmp_path):
    b = make_bundle(tmp_path, "m", precision="auto")
    cfg = json.loads((b / "config.json").read_text())
    assert cfg["precision"] == resolve_precision("auto").label != "auto"
    assert cfg["train_config"]["precision"] == resolve_precision("auto").dtype
    assert cfg["runtime"] == "torch"
    assert cfg["data"] == {"name": "Flickr8k", "layout": "flickr8k-official",
                           "split_source": "official", "split": OFFICIAL_NOTE,
                           "images": {"train": 3, "dev": 1, "test": 2}}  # fmt: skip
    assert "auto" not in json.dumps({k: v for k, v in cfg.items() if k != "train_config"})


def test_card_states_the_real_layout_and_split(tmp_path):
    """Old code wrote "Flickr8k, official split" for any data."""
    card = (make_bundle(tmp_path, "k", layout="flickr8k-kaggle") / "card.md").read_text()
    assert "flickr8k-kaggle layout" in card and "NOT the official Flickr8k split" in card
    assert "Data: Flickr8k," in card and "3 train, 1 dev, 2 test images" in card
    official = (make_bundle(tmp_path, "o") / "card.md").read_text()
    assert "flickr8k-official layout (official Flickr8k split)" in official


def test_export_removes_the_records_of_old_weights(tmp_path):
    b = make_bundle(tmp_path, "m")
    record(b, setting())
    (b / "bench.json").write_text("{}")
    assert read_records(b) and list(b.glob("predictions_*.csv"))
    b2 = make_bundle(tmp_path, "m")
    assert read_records(b2) == [] and not list(b2.glob("predictions_*.csv"))
    assert not (b2 / "bench.json").exists()
    assert "No evaluation recorded yet" in (b2 / "card.md").read_text()


# ---------------------------------------------------------------- §3: metrics keyed by setting


def test_other_alpha_precision_or_runtime_never_overwrites_the_default_row(tmp_path):
    """Old code keyed metrics.json by split and beam only: --length-alpha overwrote the row."""
    b = make_bundle(tmp_path, "m", precision="fp32")  # its own precision: fp32
    record(b, setting(), scores={**SCORES, "bleu4": 20.0})
    _, replaced = record(b, setting(alpha=1.0), scores={**SCORES, "bleu4": 21.0})
    assert not replaced
    record(b, setting(precision="bf16+cl"), scores={**SCORES, "bleu4": 22.0})
    record(b, setting(runtime="openvino"), scores={**SCORES, "bleu4": 23.0})
    record(b, setting(no_repeat_ngram=3), scores={**SCORES, "bleu4": 24.0})
    rs = results(info(b))
    assert len(rs) == 5 and len({r.predictions for r in rs}) == 5
    default = default_result(info(b), "test")
    assert default.metrics["bleu4"] == 20.0
    assert default.setting == setting() and default.setting.label == "test beam 3 α 0 fp32 torch"
    assert sum(r.default for r in rs) == 1


def test_same_setting_replaces_its_row_and_its_predictions(tmp_path):
    b = make_bundle(tmp_path, "m")
    record(b, setting(beam=2), scores={**SCORES, "bleu4": 1.0})
    _, replaced = record(b, setting(beam=2), scores={**SCORES, "bleu4": 2.0})
    assert replaced
    (r,) = results(info(b))
    assert r.metrics["bleu4"] == 2.0 and len(list(b.glob("predictions_*.csv"))) == 1


def test_default_row_follows_the_bundles_default_decoding(tmp_path):
    b = make_bundle(tmp_path, "m")
    record(b, setting(beam=3))
    record(b, setting(beam=5))
    record(b, setting(beam=5, split="dev", limit=1), images=("d.jpg",))
    assert default_result(info(b)).beam == 3
    set_decode_defaults(b, beam_size=5)
    assert default_result(info(b)).beam == 5
    marked = [(r.setting.split, r.setting.limit, r.beam) for r in results(info(b)) if r.default]
    assert sorted(marked) == [("dev", 1, 5), ("test", 0, 5)]
    set_decode_defaults(b, beam_size=4)
    assert default_result(info(b)) is None  # not evaluated at the default: say so, not guess


def test_the_card_says_how_the_default_decoding_was_chosen(tmp_path):
    b = make_bundle(tmp_path, "m")
    assert "not yet chosen on dev: run `tune-decoding --apply`" in card_markdown(b)
    set_decode_defaults(b, "dev CIDEr-D", beam_size=5)  # as tune-decoding --apply does
    assert "beam 5 α 0 (chosen on dev CIDEr-D by `tune-decoding`)" in card_markdown(b)
    set_decode_defaults(b, beam_size=2)  # a change by hand is not a choice on dev
    assert "beam 2 α 0 (the built-in default, not yet chosen" in card_markdown(b)
    assert "decode_chosen_by" not in json.loads((b / "config.json").read_text())


def test_default_prefers_the_bundles_own_precision(tmp_path):
    b = make_bundle(tmp_path, "m", precision="fp32")
    record(b, setting(precision="bf16+cl"), scores={**SCORES, "bleu4": 9.0})
    record(b, setting(precision="fp32"), scores={**SCORES, "bleu4": 8.0})
    record(b, setting(precision="bf16+cl", alpha=0.5))
    assert default_result(info(b)).setting.precision == "fp32"


def test_version1_metrics_are_read_with_their_numbers_kept(tmp_path):
    b = make_bundle(tmp_path, "m")
    set_decode_defaults(b, beam_size=5, length_alpha=0.5)
    m = {**SCORES, "n_images": 2, "split": "test", "precision": "bf16+cl", "length_alpha": 0.5}
    old = {"test": {"beam5": {**m, "beam": 5}, "beam1": {**m, "beam": 1, "bleu4": 3.25}},
           "dev_first50": {"beam5": {**m, "beam": 5, "split": "dev", "n_images": 50,
                                     "meteor_error": "METEOR not requested"}}}  # fmt: skip
    (b / "metrics.json").write_text(json.dumps(old))
    write_predictions(b / "predictions_test_beam5.csv", [])
    rs = {(r.setting.split, r.setting.limit, r.beam): r for r in results(info(b))}
    assert set(rs) == {("test", 0, 5), ("test", 0, 1), ("dev", 50, 5)}
    assert rs[("test", 0, 1)].metrics["bleu4"] == 3.25 and rs[("test", 0, 5)].default
    assert rs[("test", 0, 5)].predictions == b / "predictions_test_beam5.csv"
    assert rs[("dev", 50, 5)].metrics["meteor_error"] == "METEOR not requested"
    assert rs[("dev", 50, 5)].setting.decoding == DecodeConfig(beam_size=5, length_alpha=0.5)
    assert rs[("dev", 50, 5)].n_images == 50 and rs[("dev", 50, 5)].default


# ---------------------------------------------------------------- reading and rendering


def test_results_markdown_and_card_show_every_setting(tmp_path):
    b = make_bundle(tmp_path, "m")
    record(b, setting())
    record(b, setting(alpha=1.0, no_repeat_ngram=2))
    md = results_markdown([info(b)], "test")
    assert "| m | beam 3 α 0 * | fp32 | torch | 60.0 | 40.0 | 30.0 | 20.0 | — |" in md
    assert "beam 3 α 1 no_repeat_ngram=2 | fp32" in md
    write_card(b)
    card = (b / "card.md").read_text()
    assert "| test | 2 | beam 3 α 0 (default) | fp32 | torch |" in card
    assert "beam 3 α 1 no_repeat_ngram=2 | fp32" in card


def test_comparison_markdown_has_one_row_per_bundle_at_its_default(tmp_path):
    a = make_bundle(tmp_path, "a", beam=5)
    b = make_bundle(tmp_path, "b", decoder="merge")
    scores = {**SCORES, "distinct": 87.5, "repeat_trigram": 0.25}
    record(a, setting(beam=3), scores={**scores, "bleu4": 11.0})  # not a's default
    record(a, setting(beam=5), scores=scores)
    (a / "bench.json").write_text(
        json.dumps({"runtime": "openvino", "beams": {"5": {"decode_ms": {"p50": 7.25}}}})
    )
    md = comparison_markdown([info(a), info(b)], "test").splitlines()
    assert len(md) == 4 and md[0].startswith("| model | encoder | decoder | decoding | BLEU-1")
    size = sum(f.stat().st_size for f in a.rglob("*") if f.is_file()) / 1e6
    assert md[2] == (f"| a | resnet50 | inject | beam 5 α 0 | 60.0 | 20.0 | 50.0 | 87.5 | 0.2 "
                     f"| 7.2 (openvino) | {size:.1f} |")  # fmt: skip
    assert md[3].startswith("| b | resnet50 | merge | beam 3 α 0 | — | — | — | — | — | — |")


def test_latency_markdown_has_a_row_per_bundle_and_runtime_with_its_machine(tmp_path):
    a = make_bundle(tmp_path, "a")
    make_bundle(tmp_path, "b")  # never benched: no row

    def beams(enc):
        return {str(k): {"encode_ms": {"p50": enc}, "decode_ms": {"p50": 10.0 * k},
                         "total_ms": {"p50": enc + 10.0 * k + 1}} for k in (1, 3)}  # fmt: skip

    (a / "bench.json").write_text(json.dumps({
        "created": "2026-12-03T08:50:43+00:00", "threads": 2, "throughput_beam": 3,
        "cpu_model": {"model": "Xeon", "bf16_flags": ["amx_bf16"]}, "folder": "/x/test1000",
        "runtimes": {
            "torch": {"precision": "bf16+cl", "beams": beams(30.0),
                      "folder": {"images": 1000, "images_per_s": 26.16}},
            "openvino": {"precision": "bf16-openvino", "beams": beams(9.0)},
        },
    }))  # fmt: skip
    md = latency_markdown([info(a), info(tmp_path / "b")]).splitlines()
    assert len(md) == 4 and md[0].startswith("| model | runtime | encode p50 ms")
    assert md[2] == (
        "| a | torch bf16+cl | 30.0 | 10.0 / 30.0 / — | 41.0 / 61.0 / — "
        "| 26.2 (1000 images, beam 3) | Xeon (amx_bf16), 2 threads, 2026-12-03 |"
    )
    assert md[3].startswith("| a | openvino bf16-openvino | 9.0 | 10.0 / 30.0 / — | 20.0 / 40.0")
    assert md[3].endswith("| — | Xeon (amx_bf16), 2 threads, 2026-12-03 |")
    old = {"created": "2026-12-02T08:00:00+00:00", "threads": 2, "cpu": "x86_64",
           "runtime": "torch", "precision": "fp32", "beams": beams(50.0)}  # fmt: skip
    (a / "bench.json").write_text(json.dumps(old))  # a record from before cpu_model
    assert (
        latency_markdown([info(a)])
        .splitlines()[2]
        .endswith("| x86_64 (CPU model not recorded), 2 threads, 2026-12-02 |")
    )


def test_unreadable_outputs_read_as_absent(tmp_path):
    b = make_bundle(tmp_path, "m")
    assert read_history(b) == [{"epoch": 1}]
    (b / "history.json").write_text("{broken")
    (b / "bench.json").write_text("[1, 2]")
    assert read_history(b) == [] and read_bench(b) is None
    (b / "metrics.json").write_text("{broken")
    assert info(b).records == []  # still listed: the model itself is fine


def test_prediction_sets_and_dashboard_table(tmp_path):
    b = make_bundle(tmp_path, "m")
    record(b, setting(), bleu=40.0)
    record(b, setting(beam=5), bleu=45.0)
    record(b, setting(split="dev", limit=1), images=("d.jpg",))  # a subset: not a table row
    sets = prediction_sets(info(b))
    assert [(r.beam, r.default, len(rows)) for r, rows in sets] == [(3, True, 2), (5, False, 2)]
    assert set(sets[0][1][0]) == set(PREDICTION_FIELDS)
    df = tables.read_predictions([info(b)])
    assert set(df.columns) == set(tables.PREDICTION_COLUMNS)
    assert df.groupby("beam")["default"].all().to_dict() == {3: True, 5: False}
    assert tables.metrics_entry(info(b))["beam"] == 3


# ---------------------------------------------------------------- where the models disagree


def test_disagreements_pair_each_model_on_its_own_default(tmp_path):
    """The shipped inject pair: resnet50-inject defaults to beam 5, vgg16-inject to beam 3.

    Old code paired equal beams, so the pair never appeared (or paired non-default rows).
    """
    r = make_bundle(tmp_path, "resnet50-inject", encoder="resnet50", beam=5)
    v = make_bundle(tmp_path, "vgg16-inject", encoder="vgg16", beam=3)
    record(r, setting(beam=5), bleu=70.0)
    record(r, setting(beam=3), bleu=10.0)  # not resnet's default: must not be used
    record(v, setting(beam=3), bleu=30.0)
    df = tables.read_predictions(list_bundles(tmp_path))
    gaps = tables.disagreements(df)
    assert len(gaps) == 2 and set(gaps["decoder"]) == {"inject"}
    assert set(gaps["resnet_beam"]) == {5} and set(gaps["vgg_beam"]) == {3}
    assert list(gaps["gap"]) == [40.0, 40.0]


def test_disagreements_without_default_rows_is_empty():
    row = {"model": "resnet50-inject", "encoder": "resnet50", "decoder": "inject", "split": "dev",
           "beam": 3, "default": False, "image": "a.jpg", "caption": "x", "logprob": -1.0,
           "bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0}  # fmt: skip
    vgg = {**row, "model": "vgg16-inject", "encoder": "vgg16"}
    assert tables.disagreements(pd.DataFrame([row, vgg])).empty


@pytest.mark.parametrize("bad", [{"decoding": {"beam": 3}}, {"split": "test"}])
def test_malformed_records_are_a_bundle_error(tmp_path, bad):
    from captioning.bundle.format import BundleError

    b = make_bundle(tmp_path, "m")
    doc = {"format": "captioning-metrics", "version": 2,
           "records": [{**setting().to_dict(), "n_images": 1, "metrics": {}, **bad}]}  # fmt: skip
    if "decoding" not in bad:
        del doc["records"][0]["decoding"]
    (b / "metrics.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="malformed metrics record"):
        read_records(b)
