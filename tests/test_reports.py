"""Records say exactly what made each number; ``captioning.bundle.reports``, ``history`` and
``latency`` read them back for the CLI and the dashboard.

Small real bundles are exported here (a tiny untrained decoder), so every test runs the code that
writes and reads ``config.json``, ``metrics.json``, ``history.json``, ``bench.json``, predictions
and the card. ``make_bundle`` and ``record`` also build the dashboard's fast test bundles.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioning.bundle import history, latency, reports
from captioning.bundle.card import card_markdown, write_card
from captioning.bundle.catalog import list_bundles
from captioning.bundle.ensemble import make_ensemble
from captioning.bundle.export import export_bundle
from captioning.bundle.format import BundleError
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
from captioning.models.bleu import BLEU_KEYS
from captioning.models.decoders import DecoderConfig, build_decoder
from captioning.models.decoding import DecodeConfig
from captioning.training.train import TrainConfig

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


def make_bundle(
    root: Path,
    name: str,
    *,
    encoder="resnet50",
    decoder="inject",
    layout="flickr8k-official",
    precision="auto",
    beam=3,
) -> Path:
    """A real (untrained, tiny) bundle written by ``export_bundle``."""
    ds = dataset(root, layout)
    vocab = Vocabulary.build((c for cs in ds.captions.values() for c in cs), min_freq=1)
    dims = dict.fromkeys(("feat_dim", "embed_dim", "hidden_dim", "attn_dim", "merge_dim"), 8)
    dcfg = DecoderConfig(kind=decoder, vocab_size=len(vocab), **dims)
    cfg = TrainConfig(encoder=encoder, decoder=decoder, precision=precision)
    out = root / name
    export_bundle(
        out,
        build_decoder(dcfg),
        vocab,
        cfg=cfg,
        dcfg=dcfg,
        history=[{"epoch": 1}],
        best_epoch=1,
        commit=None,
        dataset=ds,
        encoder_sha256="0" * 64,
        select_metric="dev_cider",
    )
    if beam != 3:
        set_decode_defaults(out, beam_size=beam)
    write_card(out)
    return out


def setting(split="test", beam=3, alpha=0.0, precision="fp32", runtime="torch", limit=0, **kw):
    return Setting(
        split, DecodeConfig(beam_size=beam, length_alpha=alpha, **kw), precision, runtime, limit
    )


def record(bundle: Path, s: Setting, scores=SCORES, images=("e.jpg", "f.jpg"), bleu=50.0):
    name = s.predictions_name()
    scored = dict.fromkeys(BLEU_KEYS, bleu)
    rows = [{"image": i, "caption": "a dog", "logprob": -1.0, **scored} for i in images]
    write_predictions(bundle / name, rows)
    return add_record(bundle, s, len(images), dict(scores), name)


def info(bundle: Path):
    (b,) = [b for b in list_bundles(bundle.parent) if b.path == bundle]
    return b


# ---------------------------------------------------------------- config and card


def test_config_stores_resolved_precision_runtime_and_data(tmp_path):
    b = make_bundle(tmp_path, "m", precision="auto")
    cfg = json.loads((b / "config.json").read_text())
    assert cfg["precision"] == resolve_precision("auto").label != "auto"
    assert cfg["train_config"]["precision"] == resolve_precision("auto").dtype
    assert cfg["runtime"] == "torch"
    assert cfg["data"] == {
        "name": "Flickr8k",
        "layout": "flickr8k-official",
        "split_source": "official",
        "split": OFFICIAL_NOTE,
        "images": {"train": 3, "dev": 1, "test": 2},
    }
    assert "auto" not in json.dumps({k: v for k, v in cfg.items() if k != "train_config"})


def test_card_states_the_real_layout_and_split(tmp_path):
    """The card names the layout and split the data really had, not "official" for any data."""
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


# ---------------------------------------------------------------- metrics keyed by setting


def test_other_alpha_precision_or_runtime_never_overwrites_the_default_row(tmp_path):
    """A record is keyed by its whole setting, so each of these gets a row of its own."""
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


def test_a_metrics_file_in_another_format_is_a_bundle_error(tmp_path):
    b = make_bundle(tmp_path, "m")
    (b / "metrics.json").write_text(json.dumps({"test": {"beam5": {**SCORES, "beam": 5}}}))
    with pytest.raises(BundleError, match="is not a captioning-metrics file"):
        read_records(b)
    assert info(b).records == []  # listed all the same: the model itself is fine


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
    assert md[2] == (
        f"| a | resnet50 | inject | beam 5 α 0 | 60.0 | 20.0 | 50.0 | 87.5 | 0.2 "
        f"| 7.2 (openvino) | {size:.1f} |"
    )
    assert md[3].startswith("| b | resnet50 | merge | beam 3 α 0 | — | — | — | — | — | — |")


def test_latency_markdown_has_a_table_per_cpu_and_a_row_per_bundle_and_runtime(tmp_path):
    a, c = make_bundle(tmp_path, "a"), make_bundle(tmp_path, "c")
    make_bundle(tmp_path, "b")  # never benched: no row

    def beams(enc):
        return {str(k): {"encode_ms": {"p50": enc}, "decode_ms": {"p50": 10.0 * k},
                         "total_ms": {"p50": enc + 10.0 * k + 1}} for k in (1, 3)}  # fmt: skip

    bench = {
        "created": "2026-12-03T08:50:43+00:00", "threads": 2, "throughput_beam": 3,
        "cpu_model": {"model": "Xeon", "bf16_flags": ["amx_bf16"]}, "folder": "/x/test1000",
        "runtimes": {
            "torch": {"precision": "bf16+cl", "beams": beams(30.0),
                      "folder": {"images": 1000, "images_per_s": 26.16}},
            "openvino": {"precision": "bf16-openvino", "beams": beams(9.0)},
        },
    }  # fmt: skip
    (a / "bench.json").write_text(json.dumps(bench))
    bare = {"created": "2026-12-02T08:00:00+00:00", "threads": 2, "cpu": "x86_64",
            "runtime": "torch", "precision": "fp32", "beams": beams(50.0)}  # fmt: skip
    (c / "bench.json").write_text(json.dumps(bare))  # a record without cpu_model
    md = latency_markdown([info(a), info(tmp_path / "b"), info(c)]).splitlines()
    assert md[0] == "**Xeon (amx_bf16), 2 threads**"
    assert md[2].startswith("| model | runtime | encode p50 ms") and md[2].endswith("images/s |")
    assert md[4] == (
        "| a | torch bf16+cl | 30.0 | 10.0 / 30.0 / — | 41.0 / 61.0 / — "
        "| 26.2 (1000 images, beam 3) |"
    )
    assert md[5].startswith("| a | openvino bf16-openvino | 9.0 | 10.0 / 30.0 / — | 20.0 / 40.0")
    assert md[5].endswith("| — |")
    assert md[6:9] == ["", "**x86_64 (CPU model not recorded), 2 threads**", ""]
    assert md[11].startswith("| c | torch fp32 | 50.0 |") and len(md) == 12
    assert "2026" not in "\n".join(md)  # a figure names its CPU, never its date


def test_unreadable_outputs_read_as_absent(tmp_path):
    b = make_bundle(tmp_path, "m")
    assert read_history(b) == [{"epoch": 1}]
    (b / "history.json").write_text("{broken")
    (b / "bench.json").write_text("[1, 2]")
    assert read_history(b) == [] and read_bench(b) is None
    (b / "metrics.json").write_text("{broken")
    assert info(b).records == []  # still listed: the model itself is fine


def test_prediction_sets_are_the_whole_split_records_with_their_rows(tmp_path):
    b = make_bundle(tmp_path, "m")
    record(b, setting(), bleu=40.0)
    record(b, setting(beam=5), bleu=45.0)
    record(b, setting(split="dev", limit=1), images=("d.jpg",))  # a subset: not a set
    sets = prediction_sets(info(b))
    assert [(r.beam, r.default, len(rows)) for r, rows in sets] == [(3, True, 2), (5, False, 2)]
    assert set(sets[0][1][0]) == set(PREDICTION_FIELDS)
    assert sets[1][1][0]["bleu4"] == 45.0 and sets[1][1][0]["image"] == "e.jpg"


@pytest.mark.parametrize("bad", [{"decoding": {"beam": 3}}, {"split": "test"}])
def test_malformed_records_are_a_bundle_error(tmp_path, bad):
    b = make_bundle(tmp_path, "m")
    doc = {
        "format": "captioning-metrics",
        "version": 2,
        "records": [{**setting().to_dict(), "n_images": 1, "metrics": {}, **bad}],
    }
    if "decoding" not in bad:
        del doc["records"][0]["decoding"]
    (b / "metrics.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="malformed metrics record"):
        read_records(b)


# ---------------------------------------------------------------- history: stages and best epochs


def write_history(bundle: Path, rows: list[dict], **config) -> None:
    """Replace the bundle's ``history.json`` (and set ``config.json`` keys, None = remove)."""
    (bundle / "history.json").write_text(json.dumps(rows))
    cfg = json.loads((bundle / "config.json").read_text())
    cfg.update(config)
    (bundle / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def test_best_epoch_is_the_first_with_the_highest_dev_cider_d():
    epochs = [{"epoch": 1, "dev_cider": 40.0, "dev_bleu4": 30.0}, {"epoch": 2, "dev_cider": 45.0},
              {"epoch": 3, "dev_cider": 45.0}, {"epoch": 4, "dev_cider": None}]  # fmt: skip
    assert history.best_epoch(epochs) == 2
    assert history.best_epoch(epochs, "dev_bleu4") == 1
    assert history.best_epoch([{"epoch": 1}]) is None


def test_history_lines_fill_stages_and_scale_the_reward(tmp_path):
    b = make_bundle(tmp_path, "m")
    xe = [{"epoch": e, "dev_cider": 40.0 + e} for e in (1, 2)]
    scst = [{"stage": "scst", "epoch": 3, "stage_epoch": 1, "reward": 0.61, "dev_cider": 47.5}]
    write_history(b, [*xe, scst[0], ["not an epoch"], {"no": "epoch"}])
    rows = history.history_lines(info(b))
    stages = [(r["line"], r["bundle"], r["stage"]) for r in rows]
    assert stages == [("m", "m", "xe"), ("m", "m", "xe"), ("m", "m", "scst")]
    assert rows[2]["reward"] == pytest.approx(61.0) and "reward" not in rows[0]
    write_history(b, [{"epoch": 1}], train_config={"finetune": "layer4"})
    assert [r["stage"] for r in history.history_lines(info(b))] == ["finetune"]
    assert history.unmarked_stage({}) == "xe" and history.dev_beam({}) == 1
    assert history.dev_beam({"train_config": {"dev_beam": 3}}) == 3


def test_training_summary_takes_the_recorded_best_epoch(tmp_path):
    """``--export-last`` keeps the last epoch: the record, not the best score, says which."""
    b = make_bundle(tmp_path, "m")
    rows = [{"epoch": 1, "dev_cider": 50.0, "dev_bleu4": 20.0, "epoch_seconds": 10.0},
            {"epoch": 2, "dev_cider": 40.0, "dev_bleu4": 21.0, "epoch_seconds": 20.0}]  # fmt: skip
    write_history(b, rows, best_epoch=2)
    (s,) = history.training_summary(info(b))
    assert (s.line, s.epochs, s.best_epoch, s.dev_cider, s.dev_bleu4) == ("m", 2, 2, 40.0, 21.0)
    assert s.epoch_seconds == 15.0 and s.samples_per_s is None and s.stages_label == "2 xe"
    write_history(b, rows, best_epoch=None, select_metric="dev_bleu4")  # no epoch recorded
    assert history.training_summary(info(b))[0].best_epoch == 2
    write_history(b, rows, select_metric=None)
    assert history.training_summary(info(b))[0].best_epoch == 1  # SELECT_METRIC: dev CIDEr-D


def test_a_soups_member_lines_take_their_runs_records(tmp_path):
    b = make_bundle(tmp_path, "soup")
    run = make_bundle(tmp_path, "run-a")  # a member whose bundle lies beside the soup
    write_history(run, [], best_epoch=3)
    rows = [
        {"epoch": e, "dev_cider": 40.0 + (e == 1), "member": m}
        for m in ("run-a", "run-b")
        for e in (1, 2, 3)
    ]
    rows.append({"epoch": 4, "stage": "scst", "dev_cider": 60.0, "member": "run-b"})
    write_history(b, rows, best_epoch=None, select_metric=None)
    summary = {s.line: s for s in history.training_summary(info(b))}
    assert list(summary) == ["soup · run-a", "soup · run-b"]
    assert summary["soup · run-a"].best_epoch == 3  # run-a's record
    assert summary["soup · run-b"].best_epoch == 4  # no record: its best dev CIDEr-D
    assert summary["soup · run-b"].stages == {"xe": 3, "scst": 1}
    assert {r["bundle"] for r in history.history_lines(info(b))} == {"soup"}


# ---------------------------------------------------------------- bench.json


def test_bench_summary_reads_the_headline_runtime(tmp_path):
    a = make_bundle(tmp_path, "a")
    keys = ("encode_ms", "decode_ms", "total_ms")
    beams = {b: {k: {"p50": 10.0 * int(b), "p90": 12.0 * int(b)} for k in keys} for b in "135"}
    (a / "bench.json").write_text(
        json.dumps(
            {"runtime": "openvino", "precision": "bf16", "beams": beams, "throughput_img_s": 7.5}
        )
    )
    s = latency.bench_summary(info(a))
    assert (s.runtime, s.precision, s.images_per_s) == ("openvino", "bf16", 7.5)
    assert s.total_ms == {1: (10.0, 12.0), 3: (30.0, 36.0), 5: (50.0, 60.0)}
    assert (s.encode_p50, s.decode_p50) == (30.0, 30.0)  # at beam 3
    assert latency.default_latency(info(a)) == (30.0, "openvino")  # the default beam: 3
    (a / "bench.json").write_text(json.dumps({"beams": {"5": beams["5"]}}))
    s = latency.bench_summary(info(a))
    assert s.total_ms[1] == (None, None) and s.encode_p50 == 50.0 and s.precision == "?"
    assert latency.default_latency(info(a)) is None
    (a / "bench.json").unlink()
    assert latency.bench_summary(info(a)) is None


# ---------------------------------------------------------------- order, best bundle, members


def test_order_puts_encoders_then_decoders_then_ensembles(tmp_path):
    for name, enc, dec in [
        ("v-att", "vgg16", "attention"),
        ("r-att", "resnet50", "attention"),
        ("r-inj", "resnet50", "inject"),
        ("v-inj", "vgg16", "inject"),
    ]:
        make_bundle(tmp_path, name, encoder=enc, decoder=dec)
    make_ensemble(tmp_path / "ens", ("r-att", "v-att"))
    names = [b.name for b in reports.order_bundles(list_bundles(tmp_path))]
    assert names == ["r-inj", "r-att", "v-inj", "v-att", "ens"]


def test_best_bundle_is_the_best_dev_cider_d_then_attention(tmp_path):
    for name, dec in [("a-inj", "inject"), ("b-att", "attention"), ("c-inj", "inject")]:
        make_bundle(tmp_path, name, decoder=dec)
    bundles = list_bundles(tmp_path)
    assert reports.best_bundle(bundles).name == "b-att"  # unscored: attention first
    record(tmp_path / "c-inj", setting(split="dev"), scores={**SCORES, "cider": 55.0})
    record(tmp_path / "b-att", setting(split="dev"), scores={**SCORES, "cider": 54.0})
    record(tmp_path / "a-inj", setting(split="test"), scores={**SCORES, "cider": 90.0})
    assert reports.best_bundle(list_bundles(tmp_path)).name == "c-inj"  # dev, never test
    with pytest.raises(ValueError, match="no bundles"):
        reports.best_bundle([])


def test_members_of_an_ensemble_are_found_beside_it(tmp_path):
    make_bundle(tmp_path, "r-inj")
    make_bundle(tmp_path, "v-att", encoder="vgg16", decoder="attention")
    make_ensemble(tmp_path / "ens", ("r-inj", "v-att"))
    by_name = {b.name: b for b in list_bundles(tmp_path)}
    ens = by_name["ens"]
    assert reports.member_paths(ens) == [tmp_path / "r-inj", tmp_path / "v-att"]
    assert reports.member_names(ens) == ["r-inj", "v-att"]
    assert reports.attending_member(ens) == "v-att"
    assert reports.attending_member(by_name["v-att"]) is None  # a single model
    files = {f.relative_to(tmp_path).as_posix() for f in reports.weight_files(ens)}
    assert {"ens/config.json", "ens/vocab.json", "r-inj/decoder.safetensors"} <= files
    assert "v-att/decoder.safetensors" in files and "ens/decoder.safetensors" not in files
    assert reports.member_paths(by_name["r-inj"]) == []


# ---------------------------------------------------------------- scores with diversity


def test_default_scores_fill_diversity_from_the_predictions_scored(tmp_path):
    b = make_bundle(tmp_path, "m")
    record(b, setting(), images=("e.jpg", "f.jpg", "g.jpg"))  # one caption, three times
    scores = reports.default_scores(info(b), "test")
    assert scores["bleu4"] == 20.0 and scores["beam"] == 3
    assert scores["distinct"] == pytest.approx(100 / 3) and scores["repeat_trigram"] == 0.0
    record(b, setting(), scores={**SCORES, "distinct": 90.0})  # recorded: kept as it is
    assert reports.default_scores(info(b), "test")["distinct"] == 90.0
    assert reports.default_scores(info(b), "dev") is None
