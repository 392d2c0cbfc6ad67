"""The dashboard's helper modules without Streamlit: its tables, charts, overlays and limits.

Bundles are small exported ones (``tests.test_reports.make_bundle``: a tiny untrained decoder,
real records, predictions and histories), so every test here is fast.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from captioning.bundle import reports
from captioning.bundle.catalog import BundleInfo, list_bundles
from captioning.bundle.soup import make_soup
from dashboard import attention, charts, components, limits, tables
from tests.test_reports import SCORES, make_bundle, record, setting, write_history

MODEL_ORDER = ["resnet50-inject", "resnet50-attention", "vgg16-inject", "vgg16-attention"]


@pytest.fixture
def four(tmp_path) -> list[BundleInfo]:
    """Four bundles, each with dev and test records and predictions (test BLEU differs)."""
    for k, name in enumerate(reversed(MODEL_ORDER)):
        encoder, decoder = name.split("-")
        b = make_bundle(tmp_path, name, encoder=encoder, decoder=decoder)
        record(b, setting(split="dev"), images=("d.jpg",), bleu=10.0 * k)
        record(b, setting(), scores={**SCORES, "cider": 40.0 + k}, bleu=20.0 + 10.0 * k)
    return list_bundles(tmp_path)


def _bundle(encoder: str, decoder: str, suffix: str = "") -> BundleInfo:
    name = f"{encoder}-{decoder}{suffix}"
    return BundleInfo(name, Path(name), encoder, decoder, {})


# ---------------------------------------------------------------- predictions


def test_predictions_come_in_display_order_and_filter(four):
    df = tables.read_predictions(four)
    assert list(df.columns) == list(tables.PREDICTION_COLUMNS)
    assert list(dict.fromkeys(df["model"])) == MODEL_ORDER
    assert df["default"].all() and set(df["split"]) == {"dev", "test"}
    f = tables.PredictionFilter(
        splits=["test"],
        models=["vgg16-inject", "resnet50-inject"],
        order=2,
        sort="score, low to high",
    )
    out = tables.filter_predictions(df, f)
    assert set(out["split"]) == {"test"} and set(out["model"]) == {
        "vgg16-inject",
        "resnet50-inject",
    }
    assert out["bleu2"].is_monotonic_increasing and len(out) == 4
    narrow = tables.filter_predictions(df, tables.PredictionFilter(score_range=(45.0, 100.0)))
    assert set(narrow["model"]) == {"resnet50-inject"}  # test BLEU 50 (the others 20-40)
    words = tables.filter_predictions(df, tables.PredictionFilter(words="dog"))
    assert len(words) == len(df)
    assert tables.filter_predictions(df, tables.PredictionFilter(words="cat")).empty
    assert set(df["precision"]) == {"fp32"} and set(df["runtime"]) == {"torch"}
    assert df["confidence"].isna().all() and not tables.has_confidence(df)  # files record none
    assert not any(s.startswith("confidence") for s in tables.sort_options(df))


def test_predictions_of_no_bundle_are_an_empty_typed_table():
    df = tables.read_predictions([])
    assert df.empty and list(df.columns) == list(tables.PREDICTION_COLUMNS)
    assert df["bleu4"].dtype == "float64" and df["default"].dtype == "bool"


def predictions_frame(rows: list[tuple]) -> pd.DataFrame:
    """``read_predictions``-like rows from ``(model, image, bleu4, confidence, default)``."""
    return pd.DataFrame(
        [
            {
                "model": m,
                "encoder": m.split("-")[0],
                "decoder": m.split("-")[1],
                "split": "test",
                "beam": 3,
                "default": default,
                "precision": "fp32",
                "runtime": "torch",
                "image": i,
                "caption": f"caption {k}",
                "logprob": -float(k),
                "confidence": c,
                **dict.fromkeys(tables.BLEU_COLUMNS, b),
            }
            for k, (m, i, b, c, default) in enumerate(rows)
        ],
        columns=list(tables.PREDICTION_COLUMNS),
    )


def test_predictions_filter_and_sort_by_confidence():
    df = predictions_frame(
        [
            ("resnet50-inject", "a.jpg", 40.0, 0.9, True),
            ("resnet50-inject", "b.jpg", 30.0, 0.2, True),
            ("vgg16-inject", "a.jpg", 20.0, 0.55, True),
            ("vgg16-inject", "b.jpg", 10.0, float("nan"), True),  # a file without confidences
        ]
    )
    assert tables.has_confidence(df)
    assert {"confidence, high to low", "confidence, low to high"} <= set(tables.sort_options(df))
    f = tables.PredictionFilter(sort="confidence, high to low")
    out = tables.filter_predictions(df, f)
    assert list(out["confidence"].iloc[:3]) == [0.9, 0.55, 0.2] and pd.isna(out["confidence"][3])
    low = tables.filter_predictions(df, tables.PredictionFilter(sort="confidence, low to high"))
    assert list(low["confidence"].iloc[:3]) == [0.2, 0.55, 0.9]  # without one: still last
    mid = tables.PredictionFilter(confidence_range=(0.5, 1.0))
    assert list(tables.filter_predictions(df, mid)["confidence"]) == [0.9, 0.55]
    unsure = tables.PredictionFilter(confidence_range=(0.0, 0.5), models=["resnet50-inject"])
    assert list(tables.filter_predictions(df, unsure)["image"]) == ["b.jpg"]
    everything = tables.filter_predictions(df, tables.PredictionFilter())
    assert len(everything) == 4  # the full range keeps the row without a confidence


def test_predictions_read_a_confidence_the_file_records(tmp_path, monkeypatch):
    """A predictions CSV with a ``confidence`` column (as the library reads it) keeps it; a
    model whose file has none gets NaN."""
    if "confidence" not in reports.PREDICTION_FLOATS:
        monkeypatch.setattr(
            reports, "PREDICTION_FLOATS", (*reports.PREDICTION_FLOATS, "confidence")
        )
    sure = make_bundle(tmp_path, "resnet50-inject")
    other = make_bundle(tmp_path, "vgg16-inject", encoder="vgg16")
    record(other, setting())
    record(sure, setting())
    name = setting().predictions_name()
    lines = (sure / name).read_text().splitlines()
    lines = [lines[0] + ",confidence"] + [
        f"{line},{c}" for line, c in zip(lines[1:], ("0.75", "0.25"), strict=True)
    ]
    (sure / name).write_text("\n".join(lines) + "\n")
    df = tables.read_predictions(list_bundles(tmp_path))
    assert tables.has_confidence(df) and df["confidence"].dtype == "float64"
    by_model = df.groupby("model")["confidence"].apply(list).to_dict()
    assert by_model["resnet50-inject"] == [0.75, 0.25]
    assert all(pd.isna(c) for c in by_model["vgg16-inject"])


def test_predictions_at_each_models_default_decoding_only(tmp_path):
    b = make_bundle(tmp_path, "resnet50-inject", beam=5)
    record(b, setting(beam=5), bleu=70.0)
    record(b, setting(beam=5, precision="int8", runtime="openvino"), bleu=60.0)
    record(b, setting(beam=3), bleu=10.0)
    (info,) = list_bundles(tmp_path)
    df = tables.read_predictions([info])
    assert len(df) == 6
    default = tables.filter_predictions(df, tables.PredictionFilter(default_only=True))
    assert len(default) == 2 and set(default["beam"]) == {5}
    chosen = reports.default_result(info, "test").setting  # one of the two beam-5 settings
    assert set(zip(default["precision"], default["runtime"], strict=True)) == {
        (chosen.precision, chosen.runtime)
    }
    rows = tables.captions_for_image(df, "e.jpg", "test", default_only=True)
    assert len(rows) == 1 and tables.setting_labels(rows) == ["resnet50-inject"]
    every = tables.captions_for_image(df, "e.jpg", "test")
    labels = tables.setting_labels(every)
    assert len(set(labels)) == 3  # each setting of the model told apart
    assert "resnet50-inject (beam 5 · int8 openvino)" in labels


def test_captions_for_an_image_follow_the_display_order(four):
    df = tables.read_predictions(four)
    rows = tables.captions_for_image(df.iloc[::-1], "e.jpg", "test")
    assert list(rows["model"]) == MODEL_ORDER[::-1]  # the order of the frame it is given
    rows = tables.captions_for_image(df, "e.jpg", "test")
    assert list(rows["model"]) == MODEL_ORDER and (rows["image"] == "e.jpg").all()
    assert tables.captions_for_image(df, "nowhere.jpg").empty


def test_disagreements_pair_resnet_and_vgg_of_one_decoder():
    rows = [("resnet50-inject", "resnet50", "inject", "a.jpg", 50.0),
            ("vgg16-inject", "vgg16", "inject", "a.jpg", 10.0),
            ("resnet50-inject", "resnet50", "inject", "b.jpg", 20.0),
            ("vgg16-inject", "vgg16", "inject", "b.jpg", 25.0),
            ("vgg16-attention", "vgg16", "attention", "a.jpg", 90.0)]  # fmt: skip
    df = pd.DataFrame(
        [
            {
                "model": m,
                "encoder": e,
                "decoder": d,
                "split": "dev",
                "beam": 3,
                "default": True,
                "image": i,
                "caption": "x",
                "logprob": -1.0,
                "bleu1": s,
                "bleu2": s,
                "bleu3": s,
                "bleu4": s,
            }
            for m, e, d, i, s in rows
        ]
    )
    gaps = tables.disagreements(df)
    assert list(gaps["image"]) == ["a.jpg", "b.jpg"]
    assert list(gaps["gap"]) == [40.0, -5.0]
    assert set(gaps["decoder"]) == {"inject"}  # no ResNet attention model to pair with
    assert tables.disagreements(df.assign(default=False)).empty  # only default decodings pair


def test_disagreements_name_both_models_when_one_model_pairs_twice():
    """``resnet50-merge`` and ``resnet50-merge-ft`` both pair with ``vgg16-merge``."""
    df = predictions_frame(
        [
            ("resnet50-merge", "a.jpg", 60.0, 0.8, True),
            ("resnet50-merge-ft", "a.jpg", 60.0, float("nan"), True),
            ("vgg16-merge", "a.jpg", 20.0, 0.4, True),
        ]
    )
    gaps = tables.disagreements(df)
    assert list(zip(gaps["resnet_model"], gaps["vgg_model"], strict=True)) == [
        ("resnet50-merge", "vgg16-merge"),
        ("resnet50-merge-ft", "vgg16-merge"),
    ]
    assert list(gaps["gap"]) == [40.0, 40.0]
    assert gaps["resnet_confidence"][0] == 0.8 and pd.isna(gaps["resnet_confidence"][1])
    assert list(gaps["vgg_confidence"]) == [0.4, 0.4]
    bare = tables.disagreements(df.drop(columns="confidence"))  # frames without the column
    assert bare["resnet_confidence"].isna().all() and len(bare) == 2


def test_disagreements_pair_each_model_on_its_own_default(tmp_path):
    """resnet50-inject defaults to beam 5, vgg16-inject to beam 3: each is taken at its own."""
    r = make_bundle(tmp_path, "resnet50-inject", encoder="resnet50", beam=5)
    v = make_bundle(tmp_path, "vgg16-inject", encoder="vgg16", beam=3)
    record(r, setting(beam=5), bleu=70.0)
    record(r, setting(beam=3), bleu=10.0)  # not resnet's default: must not be used
    record(v, setting(beam=3), bleu=30.0)
    df = tables.read_predictions(list_bundles(tmp_path))
    assert df.groupby(["model", "beam"])["default"].all().to_dict() == {
        ("resnet50-inject", 3): False,
        ("resnet50-inject", 5): True,
        ("vgg16-inject", 3): True,
    }
    gaps = tables.disagreements(df)
    assert len(gaps) == 2 and set(gaps["decoder"]) == {"inject"}
    assert set(gaps["resnet_beam"]) == {5} and set(gaps["vgg_beam"]) == {3}
    assert list(gaps["gap"]) == [40.0, 40.0]


# ---------------------------------------------------------------- metrics and scores


def test_corpus_metrics_and_their_chart(four):
    wide = tables.corpus_metrics(four, "test")
    assert list(wide["model"]) == MODEL_ORDER and set(wide["beam"]) == {3}
    assert list(wide["cider"]) == [43.0, 42.0, 41.0, 40.0]
    long = tables.metrics_long(wide)
    assert set(long["label"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "METEOR"}
    fig = charts.metrics_bars(long, charts.model_colors([]), title="t")
    assert [t.name for t in fig.data] == MODEL_ORDER
    assert "METEOR" not in fig.data[0].x  # null for every model
    assert tables.corpus_metrics(four, "nowhere").empty


def test_score_summary_adds_diversity_from_the_predictions(four):
    summary = tables.score_summary(four, "test")
    assert list(summary.columns) == ["model", "beam", *tables.SUMMARY_METRICS]
    assert list(summary["model"]) == MODEL_ORDER
    assert list(summary["distinct"]) == [50.0] * 4  # "a dog" twice: one caption in two
    assert (summary["repeat_trigram"] == 0.0).all()


# ---------------------------------------------------------------- history


def test_history_of_an_scst_bundle_shows_both_stages(tmp_path):
    """Cross-entropy epochs without a stage field, then SCST epochs with a raw reward."""
    b = make_bundle(tmp_path, "m-scst", decoder="attention")
    xe = [{"epoch": e, "train_loss": 3.0 - e / 10, "dev_cider": 40.0 + e} for e in (1, 2)]
    scst = [{"stage": "scst", "epoch": 3, "stage_epoch": 1, "reward": 0.61, "dev_cider": 47.5}]
    write_history(b, xe + scst, best_epoch=3)
    (info,) = list_bundles(tmp_path)
    hist = tables.read_history([info])
    assert list(hist.columns) == ["model", "bundle", *tables.HISTORY_COLUMNS]
    assert list(hist["stage"]) == ["xe", "xe", "scst"]
    assert hist["reward"].iloc[2] == pytest.approx(61.0) and hist["reward"].iloc[:2].isna().all()
    fig = charts.history_chart(hist, {"dev_cider": "dev CIDEr-D"}, {}, title="t", ytitle="y")
    assert list(fig.data[0].marker.symbol) == ["circle", "circle", "diamond"]
    summary = tables.training_summary([info])
    assert summary["stages"].iloc[0] == "2 xe + 1 scst" and summary["best epoch"].iloc[0] == 3
    assert summary["dev CIDEr-D"].iloc[0] == 47.5


def test_history_of_a_finetuned_warm_start_marks_its_stage(tmp_path):
    """``train --init B --finetune …``: B's xe epochs, then squares for the fine-tuning ones."""
    b = make_bundle(tmp_path, "m-ft", decoder="attention")
    rows = [
        {"stage": "xe", "epoch": 1, "dev_cider": 40.0},
        {"stage": "xe", "epoch": 2, "dev_cider": 42.0},
        {"stage": "finetune", "epoch": 3, "stage_epoch": 1, "dev_cider": 45.0},
    ]
    write_history(b, rows)
    (info,) = list_bundles(tmp_path)
    hist = tables.read_history([info])
    fig = charts.history_chart(hist, {"dev_cider": "dev CIDEr-D"}, {}, title="t", ytitle="y")
    assert list(fig.data[0].marker.symbol) == ["circle", "circle", "square"]
    assert tables.training_summary([info])["stages"].iloc[0] == "2 xe + 1 finetune"
    # a run that tuned its block from the start (no stage field): all its epochs fine-tune
    write_history(b, [{"epoch": 1, "dev_cider": 40.0}], train_config={"finetune": "layer4"})
    (info,) = list_bundles(tmp_path)
    assert list(tables.read_history([info])["stage"]) == ["finetune"]


@pytest.fixture
def soup_world(tmp_path) -> list[BundleInfo]:
    """A plain bundle and a soup (``make_soup``) of three runs: ``a`` and ``b`` ran epochs 1-2
    (10 and 20 s each), ``c`` one SCST epoch 3."""
    runs, models = tmp_path / "runs", tmp_path / "models"
    for k, name in enumerate("ab"):
        make_bundle(runs, name, decoder="attention")
        rows = [{"epoch": e, "dev_cider": 40.0 + e + 2 * k, "epoch_seconds": 10.0 * (k + 1)}
                for e in (1, 2)]  # fmt: skip
        write_history(runs / name, rows, best_epoch=2)
    make_bundle(runs, "c", decoder="attention")
    scst = [{"epoch": 3, "stage": "scst", "dev_cider": 50.0, "reward": 0.5, "epoch_seconds": 30.0}]
    write_history(runs / "c", scst, best_epoch=3)
    make_soup(models / "soup", [str(runs / name) for name in "abc"])
    make_bundle(models, "plain")
    write_history(
        models / "plain", [{"epoch": e, "dev_cider": 30.0 + e} for e in (1, 2)], best_epoch=2
    )
    return list_bundles(models)


def test_a_soup_is_one_line_the_mean_of_its_runs_and_its_members_on_demand(soup_world):
    hist = tables.read_history(soup_world)
    assert list(dict.fromkeys(hist["model"])) == ["plain", "soup · a", "soup · b", "soup · c"]
    assert tables.soups(hist) == ["soup"]
    lines = tables.shown_history(hist, ["plain", "soup"], members=False)
    assert list(dict.fromkeys(lines["model"])) == ["plain", "soup"]
    soup = lines[lines["model"] == "soup"].set_index("epoch")
    assert list(soup["dev_cider"]) == [42.0, 43.0, 50.0]  # a and b averaged, then c alone
    assert list(soup["runs"]) == [2, 2, 1] and list(soup["stage"]) == ["xe", "xe", "scst"]
    assert soup.loc[3, "reward"] == pytest.approx(50.0)
    assert (lines.loc[lines["model"] == "plain", "runs"] == 1).all()
    members = tables.shown_history(hist, ["soup"], members=True)
    assert list(dict.fromkeys(members["model"])) == ["soup · a", "soup · b", "soup · c"]
    assert tables.shown_history(hist, ["plain"], members=False)["model"].eq("plain").all()
    assert tables.soups(hist[hist["bundle"] == "plain"]) == []


def test_a_soups_summary_row_has_no_best_epoch_and_its_members_rows_do(soup_world):
    hist = tables.read_history(soup_world)
    summary = tables.training_summary(soup_world)
    both = tables.shown_summary(summary, hist, ["plain", "soup"], members=False)
    assert list(both["model"]) == ["plain", "soup"]
    soup = both.set_index("model").loc["soup"]
    assert soup["stages"] == "soup of 3 runs" and soup["epochs"] == 3
    assert pd.isna(soup["best epoch"]) and pd.isna(soup["dev CIDEr-D"])
    assert soup["s / epoch"] == pytest.approx((2 * 10 + 2 * 20 + 30) / 5)  # its 5 epochs
    assert both.set_index("model").loc["plain", "dev CIDEr-D"] == 32.0
    members = tables.shown_summary(summary, hist, ["soup"], members=True)
    assert list(members["model"]) == ["soup · a", "soup · b", "soup · c"]
    assert list(members["best epoch"]) == [2, 2, 3]  # each run's own, from its bundle's config
    assert tables.shown_summary(summary, hist, [], members=False).empty


def test_soup_members_are_shades_of_the_soups_colour_and_one_key_names_every_line(soup_world):
    hist = tables.read_history(soup_world)
    colors = charts.model_colors(["plain", "soup"])
    members = tables.shown_history(hist, ["plain", "soup"], members=True)
    fig = charts.history_chart(members, {"dev_cider": "dev CIDEr-D"}, colors, title="t", ytitle="y")
    assert [t.name for t in fig.data] == ["plain", "soup · a", "soup · b", "soup · c"]
    shades = [t.line.color for t in fig.data[1:]]
    assert len(set(shades)) == 3 and colors["soup"] not in shades
    lightness = [sum(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in shades]
    assert lightness == sorted(lightness)  # darkest to lightest, in member order
    assert fig.layout.showlegend is False  # the key stands for a legend
    key = charts.color_key(members, colors)
    assert key.count(f"class='{charts.KEY_CLASS}'") == 4
    assert key.index("soup · a") < key.index("soup · b") and shades[1] in key
    lines = tables.shown_history(hist, ["plain", "soup"], members=False)
    assert charts.color_key(lines, colors).count(f"class='{charts.KEY_CLASS}'") == 2
    fig = charts.history_chart(lines, {"dev_cider": "dev CIDEr-D"}, colors, title="t", ytitle="y")
    assert [t.line.color for t in fig.data] == [colors["plain"], colors["soup"]]
    assert list(fig.data[1].customdata) == [" (mean of 2 runs)", " (mean of 2 runs)", ""]


def test_history_of_no_bundle_is_an_empty_table():
    hist = tables.read_history([])
    assert hist.empty and list(hist.columns) == ["model", "bundle", *tables.HISTORY_COLUMNS]
    assert tables.training_summary([]).empty
    assert tables.dev_decoding([]) == "greedy"


def test_dev_decoding_names_the_beams_training_used(tmp_path):
    make_bundle(tmp_path, "a")
    b = make_bundle(tmp_path, "b")
    assert tables.dev_decoding(list_bundles(tmp_path)) == "greedy"
    cfg = json.loads((b / "config.json").read_text())
    cfg["train_config"]["dev_beam"] = 3
    (b / "config.json").write_text(json.dumps(cfg))
    assert tables.dev_decoding(list_bundles(tmp_path)) == "beam 1/3"


# ---------------------------------------------------------------- latency, n-best


def test_latency_from_bench_json(four):
    dst = four[0].path
    keys = ("encode_ms", "decode_ms", "total_ms")
    beams = {b: {k: {"p50": 10.0 * int(b), "p90": 12.0 * int(b)} for k in keys} for b in "135"}
    (dst / "bench.json").write_text(
        json.dumps({"precision": "bf16", "beams": beams, "throughput_img_s": 7.5})
    )
    lat = tables.latency_table(four).set_index("model")
    assert list(lat.index) == MODEL_ORDER and list(lat.columns) == list(tables.LATENCY_COLUMNS[1:])
    row = lat.loc[four[0].name]
    assert row["status"] == "bf16" and row["beam 5 p90 ms"] == 60.0
    assert row["encode p50 ms"] == 30.0 and row["images / s"] == 7.5
    others = lat.drop(index=four[0].name)
    assert set(others["status"]) == {tables.NOT_BENCHMARKED}
    assert others["beam 1 p50 ms"].isna().all()


def test_nbest_table_has_a_per_token_log_prob():
    table = tables.nbest_table([("a dog runs", -2.0), ("a dog", -3.0)])
    assert list(table["rank"]) == [1, 2] and list(table["per token"]) == [-0.5, -1.0]
    assert list(tables.nbest_table([]).columns) == ["rank", "caption", "log-prob", "per token"]


# ---------------------------------------------------------------- names, grid, colours


def test_encoder_names_for_display():
    assert tables.encoder_family("resnet50-tv") == "resnet"
    assert tables.pretty_encoder("resnet50") == "ResNet50"
    assert tables.pretty_encoder("resnet50,vgg16") == "ResNet50 + VGG16"
    assert tables.pretty_encoder_group("resnet50+layer4") == "ResNet50 encoder, layer4 fine-tuned"
    assert tables.pretty_encoder_group("vgg16") == "VGG16 encoder"
    assert tables.pretty_encoder_group("resnet50,vgg16") == "Ensembles of ResNet50 + VGG16"


def test_model_grid_lines_up_decoders_across_encoders():
    six = [_bundle(e, d) for d in ("attention", "merge", "inject") for e in ("vgg16", "resnet50")]
    grid = components.model_grid(six)
    assert [(enc, [b.decoder for b in cells]) for enc, cells in grid] == [
        ("resnet50", ["inject", "merge", "attention"]),
        ("vgg16", ["inject", "merge", "attention"]),
    ]
    gap = components.model_grid(
        [
            _bundle("resnet50", "inject"),
            _bundle("vgg16", "attention"),
            _bundle("resnet50", "attention"),
        ]
    )
    assert [[b and b.name for b in cells] for _, cells in gap] == [
        ["resnet50-inject", "resnet50-attention"],
        [None, "vgg16-attention"],
    ]
    tuned = _bundle("resnet50", "merge", "-ft")
    tuned.config["encoder_block"] = {"block": "layer4"}
    grid = components.model_grid([*six, tuned])  # a fine-tuned encoder is a row of its own
    assert [(enc, [b and b.name for b in cells]) for enc, cells in grid] == [
        ("resnet50", ["resnet50-inject", "resnet50-merge", "resnet50-attention"]),
        ("resnet50+layer4", [None, "resnet50-merge-ft", None]),
        ("vgg16", ["vgg16-inject", "vgg16-merge", "vgg16-attention"]),
    ]
    twice = components.model_grid(
        [_bundle("vgg16", "attention"), _bundle("vgg16", "attention", "2")]
    )
    assert [len(cells) for _, cells in twice] == [2]


def test_model_colors_are_distinct_and_follow_the_display_order():
    names = [f"m{k}" for k in range(12)]
    colors = charts.model_colors(names)
    assert [colors[n] for n in names[:10]] == list(charts.PALETTE)
    assert len(set(charts.PALETTE)) == 10 and colors["m10"] == charts.PALETTE[0]
    assert charts.model_colors(["b", "a", "b"]) == {"b": charts.PALETTE[0], "a": charts.PALETTE[1]}
    assert charts.shade("#204060", 0.5) == "#90A0B0"
    assert charts.shade("#204060", -0.5) == "#102030" and charts.shade("#204060", 0.0) == "#204060"


# ---------------------------------------------------------------- attention overlay, limits


def test_attention_overlay_is_smooth_and_sized():
    photo = Image.new("RGB", (300, 200), (200, 200, 200))
    weights = np.zeros((7, 7), dtype=np.float32)
    weights[0, 0] = 1.0
    out = attention.attention_overlay(photo, weights, max_side=150)
    assert out.size == (150, 100) and out.mode == "RGB"
    px = np.asarray(out, dtype=np.float32).mean(axis=2)
    assert px[2, 2] > px[-3, -3]  # bright where the model looks, dark elsewhere
    assert len(np.unique(px[:, :40].round())) > 10  # a smooth ramp, not 7x7 blocks
    flat = attention.attention_overlay(photo, np.zeros((7, 7)), max_side=150)
    assert flat.size == (150, 100)


def test_attention_fit_never_copies_at_full_size():
    big = Image.new("L", (6000, 4000), 128)
    small = attention.fit(big, 300)
    assert small.size == (300, 200) and small.mode == "RGB"
    tiny = Image.new("RGB", (50, 40))
    assert attention.fit(tiny, 300).size == (50, 40) and attention.fit(tiny, 300) is not tiny


def test_inference_slots_come_from_the_cpus_and_threads():
    from captioning.core.machine import usable_cpus

    assert limits.inference_slots(8, 2) == 4 and limits.inference_slots(2, 4) == 1
    assert limits.inference_slots(3, 0) == 3
    assert 1 <= limits.SLOTS <= usable_cpus()


def test_inference_slots_bound_concurrency():
    lock, active, peak = threading.Lock(), [0], [0]

    def work() -> None:
        with limits.inference_slot() as waited:
            assert waited >= 0.0
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4 * limits.SLOTS + 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == limits.SLOTS >= 1


def test_inference_slots_are_handed_out_in_arrival_order():
    slots, order, lock = limits.FairSlots(1), [], threading.Lock()
    slots.acquire()  # the slot is taken: everyone below queues

    def wait_turn(name: str, queued: threading.Event) -> None:
        queued.set()
        with slots, lock:
            order.append(name)

    threads = []
    for name in ("first", "second", "third"):
        queued = threading.Event()
        t = threading.Thread(target=wait_turn, args=(name, queued))
        t.start()
        queued.wait()
        time.sleep(0.05)  # it is waiting before the next one arrives
        threads.append(t)
    slots.release()
    with slots, lock:  # the releasing caller asks again at once: it queues behind the three
        order.append("again")
    for t in threads:
        t.join(10)
    assert order == ["first", "second", "third", "again"]
