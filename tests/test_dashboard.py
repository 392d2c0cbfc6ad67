"""The dashboard through Streamlit's AppTest on the tiny world, plus its helper modules.

No browser: ``tests/test_browser.py`` drives a real server. Captioners are cached per process
(``st.cache_resource``), so only the first test that captions pays for loading them.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from captioning.bundle.catalog import BundleInfo, list_bundles
from captioning.data import load_flickr8k
from captioning.inference.captioner import Captioner
from dashboard import attention, charts, components, limits, tables
from tests import hostile

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboard" / "app.py"
SAMPLE = REPO / "artifacts" / "samples" / "chelsea.jpg"
MODEL_ORDER = ["resnet50-inject", "resnet50-attention", "vgg16-inject", "vgg16-attention"]
PAGES = ("caption", "compare", "training", "explore")


@pytest.fixture
def app(tiny_world, monkeypatch) -> AppTest:
    """The app on the tiny world (data set and four bundles), not yet run."""
    monkeypatch.setenv("CAPTIONING_DATA", str(tiny_world.data))
    monkeypatch.setenv("CAPTIONING_MODELS", str(tiny_world.models))
    monkeypatch.setenv("CAPTIONING_CACHE", str(tiny_world.cache))
    return AppTest.from_file(str(APP), default_timeout=120)


def open_page(at: AppTest, page: str) -> AppTest:
    """Run the app, then switch to ``page`` (switch_page needs a run before and after)."""
    at.run()
    if page != "caption":
        at.switch_page(f"app_pages/{page}.py").run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(at: AppTest) -> str:
    """All markdown, captions, subheaders and alerts of the current run, as one string."""
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [s.value for s in at.subheader] + [i.value for i in at.info]
    return "\n".join(str(p) for p in parts)


def frame(at: AppTest, column: str):
    """The first dataframe of the run that has ``column`` (pages show several tables)."""
    return next(d for d in at.dataframe if column in d.value.columns)


def caption_text(at: AppTest) -> str:
    block = at.main.get_by_key("caption-result")
    return block.subheader[0].value


def upload(at: AppTest, page: str, name: str, data: bytes, mime: str = "image/jpeg") -> AppTest:
    at.segmented_control(key=f"{page}-source").set_value("upload").run()
    at.file_uploader(key=f"{page}-upload").upload(name, data, mime).run()
    return at


# ---------------------------------------------------------------- Caption


def test_caption_page_shows_a_caption_for_the_sample(app, tiny_world):
    at = open_page(app, "caption")
    assert at.title[0].value == "Caption a photo"
    assert caption_text(at).startswith("“")
    labels = [m.label for m in at.metric]
    assert {"Encode", "Decode", "Log-prob"} <= set(labels)
    assert all(m.value.endswith(" ms") for m in at.metric if m.label in ("Encode", "Decode"))
    nbest = at.dataframe[0].value
    assert list(nbest.columns) == ["rank", "caption", "log-prob", "per token"]
    best = tables.default_model(list_bundles(tiny_world.models)).name
    assert at.selectbox(key="caption-model").value == best  # the best on dev
    assert "Where the model looks" in [s.value for s in at.subheader]
    assert len(at.image) >= 2  # the photo and its attention overlay


def test_caption_page_upload_real_photo(app):
    at = open_page(app, "caption")
    upload(at, "caption", "chelsea.jpg", SAMPLE.read_bytes())
    assert_clean(at)
    assert not at.error
    text = caption_text(at)
    assert text.startswith("“") and len(text) > 2
    assert "chelsea.jpg" in [c for img in at.image for c in img.captions]


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("broken.jpg", b"this is not an image at all", "not an image"),
        ("truncated.jpg", SAMPLE.read_bytes()[:3000], "truncated"),
    ],
)
def test_caption_page_broken_upload_shows_error(app, name, data, why):
    at = open_page(app, "caption")
    upload(at, "caption", name, data)
    assert_clean(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith(name) and why in errors[0], errors
    # the app keeps serving: switch back to a sample and caption it
    at.segmented_control(key="caption-source").set_value("sample").run()
    assert_clean(at)
    assert not at.error and caption_text(at).startswith("“")


def test_caption_page_beam_and_model_without_attention(app):
    at = open_page(app, "caption")
    at.selectbox(key="caption-model").set_value("vgg16-inject").run()
    at.slider(key="caption-beam").set_value(1).run()
    assert_clean(at)
    assert caption_text(at).startswith("“")
    assert len(at.dataframe[0].value) == 1  # greedy: a single hypothesis
    assert "Where the model looks" not in [s.value for s in at.subheader]
    assert "has no attention" in texts(at)


def test_caption_page_attention_word_slider(app):
    at = open_page(app, "caption")
    upload(at, "caption", "chelsea.jpg", SAMPLE.read_bytes())
    sliders = [s for s in at.select_slider if s.label == "Word"]
    if not sliders:
        pytest.skip("the tiny model's caption of this photo has a single word")
    n = len(sliders[0].options)  # the options are word indices, shown as "k. word"
    sliders[0].set_value(n - 1).run()
    assert_clean(at)
    assert f"word {n} of {n}" in texts(at)


# ---------------------------------------------------------------- Compare


def test_compare_page_one_column_per_model_in_order(app):
    at = open_page(app, "compare")
    upload(at, "compare", "chelsea.jpg", SAMPLE.read_bytes())
    assert_clean(at)
    keys = [b.key for b in at.container if (b.key or "").startswith("compare-model-")]
    assert keys == [f"compare-model-{name}" for name in MODEL_ORDER]
    for key in keys:
        card = at.main.get_by_key(key)
        assert [m.label for m in card.metric] == ["Encode", "Decode", "Runtime"]
        assert card.metric[2].value in ("torch", "openvino", "openvino+torch")
        assert any(m.value.startswith("#### ") for m in card.markdown)


def test_compare_page_dataset_image_shows_references_and_scores(app, tiny_world):
    at = open_page(app, "compare")
    at.segmented_control(key="compare-source").set_value("dataset").run()
    assert_clean(at)
    assert "Reference captions" in texts(at)
    refs = [m.value for m in at.markdown if m.value.startswith("1. ")]
    assert refs and refs[0].count("\n") >= 1
    assert texts(at).count("smoothed sentence BLEU-4") == len(MODEL_ORDER)
    at.selectbox(key="compare-split").set_value("test").run()
    assert_clean(at)


def test_compare_page_metrics_chart_and_latency(app):
    at = open_page(app, "compare")
    charts_ = at.get("plotly_chart")
    assert len(charts_) == 1
    fig = json.loads(charts_[0].proto.spec)
    assert "corpus BLEU (test split, beam 3)" in fig["layout"]["title"]["text"]
    assert [t["name"] for t in fig["data"]] == MODEL_ORDER
    assert fig["data"][0]["x"][:4] == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
    latency = at.dataframe[-1].value
    assert set(latency["precision"]) == {"not benchmarked"}


# ---------------------------------------------------------------- Training


def test_training_page_charts(app):
    at = open_page(app, "training")
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(figs) == 4
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert titles[0].startswith("Loss") and "BLEU-4" in titles[1] and "CIDEr" in titles[2]
    assert {t["name"] for t in figs[0]["data"]} == set(MODEL_ORDER)
    at.multiselect(key="training-models").set_value(["vgg16-attention"]).run()
    assert_clean(at)
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert {t["name"] for t in figs[1]["data"]} == {"vgg16-attention"}
    at.multiselect(key="training-models").set_value([]).run()
    assert_clean(at)
    assert not at.get("plotly_chart") and "Select at least one model." in texts(at)


# ---------------------------------------------------------------- Explore


def test_explore_page_filters_reduce_rows(app):
    at = open_page(app, "explore")
    table = frame(at, "caption").value
    total = len(table)
    assert total > 0 and set(table["split"]) == {"dev", "test"}
    at.slider(key="explore-range").set_value((5.0, 100.0)).run()
    assert_clean(at)
    kept = frame(at, "caption").value
    assert 0 < len(kept) < total and (kept["bleu4"] >= 5.0).all()
    assert kept["bleu4"].is_monotonic_decreasing
    at.segmented_control(key="explore-order").set_value(1).run()
    assert "Smoothed sentence BLEU-1 range" in [s.label for s in at.slider]
    at.text_input(key="explore-words").set_value("green").run()
    assert_clean(at)
    words = frame(at, "caption").value
    assert len(words) > 0 and words["caption"].str.split().apply(lambda w: "green" in w).all()
    at.multiselect(key="explore-models").set_value(["vgg16-attention"]).run()
    assert set(frame(at, "caption").value["model"]) <= {"vgg16-attention"}


def test_explore_page_row_selection_shows_image_references_and_captions(app):
    at = open_page(app, "explore")
    table = frame(at, "caption")
    first = table.value.iloc[0]
    at.session_state[table.key] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert_clean(at)
    assert f"##### {first['image']} · {first['split']} split" in texts(at)
    assert "Reference captions" in texts(at)
    assert len(at.image) == 1
    captions = at.table[0].value
    assert set(MODEL_ORDER) <= {m.split(" (")[0] for m in captions.index}


def test_explore_page_disagreement_view(app):
    at = open_page(app, "explore")
    gaps = frame(at, "gap").value
    assert len(gaps) > 0
    assert (gaps["decoder"].isin(["inject", "attention"])).all()
    assert gaps["gap"].abs().is_monotonic_decreasing


# ---------------------------------------------------------------- missing models / data


@pytest.mark.parametrize("page", PAGES)
def test_empty_models_dir_shows_how_to_train(app, monkeypatch, tmp_path, page):
    monkeypatch.setenv("CAPTIONING_MODELS", str(tmp_path / "no-models-here"))
    at = open_page(app, page)
    assert "No trained models yet" in texts(at)
    assert "python -m captioning train" in texts(at)


@pytest.mark.parametrize("unset", [True, False])
def test_explore_without_data_dir_explains_how_to_set_it(app, monkeypatch, tmp_path, unset):
    if unset:
        monkeypatch.delenv("CAPTIONING_DATA")
    else:
        monkeypatch.setenv("CAPTIONING_DATA", str(tmp_path / "missing"))
    at = open_page(app, "explore")
    assert "export CAPTIONING_DATA=/path/to/flickr8k" in texts(at)
    assert len(frame(at, "caption").value) > 0  # the tables still work
    table = frame(at, "caption")
    at.session_state[table.key] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert_clean(at)
    assert "Set `CAPTIONING_DATA` to see the image" in texts(at)
    assert len(at.table) == 1  # every model's caption, from the predictions files


def test_compare_dataset_source_without_data_dir(app, monkeypatch):
    monkeypatch.delenv("CAPTIONING_DATA")
    at = open_page(app, "compare")
    at.segmented_control(key="compare-source").set_value("dataset").run()
    assert_clean(at)
    assert "export CAPTIONING_DATA=/path/to/flickr8k" in texts(at)


# ---------------------------------------------------------------- helpers


def test_tables_predictions_order_and_filters(tiny_world):
    bundles = list_bundles(tiny_world.models)
    assert [b.name for b in tables.order_bundles(bundles)] == MODEL_ORDER
    df = tables.read_predictions(bundles)
    assert set(df.columns) == set(tables.PREDICTION_COLUMNS)
    f = tables.PredictionFilter(splits=["dev"], models=["vgg16-inject"], order=2,
                                score_range=(0.0, 100.0), sort="score, low to high")  # fmt: skip
    out = tables.filter_predictions(df, f)
    assert set(out["split"]) == {"dev"} and set(out["model"]) == {"vgg16-inject"}
    assert out["bleu2"].is_monotonic_increasing


def test_tables_disagreements_pairs_same_decoder():
    rows = [("resnet50-inject", "resnet50", "inject", "a.jpg", 50.0),
            ("vgg16-inject", "vgg16", "inject", "a.jpg", 10.0),
            ("resnet50-inject", "resnet50", "inject", "b.jpg", 20.0),
            ("vgg16-inject", "vgg16", "inject", "b.jpg", 25.0),
            ("vgg16-attention", "vgg16", "attention", "a.jpg", 90.0)]  # fmt: skip
    df = pd.DataFrame(
        [{"model": m, "encoder": e, "decoder": d, "split": "dev", "beam": 3, "default": True,
          "image": i, "caption": "x", "logprob": -1.0,
          "bleu1": s, "bleu2": s, "bleu3": s, "bleu4": s}
         for m, e, d, i, s in rows]
    )  # fmt: skip
    gaps = tables.disagreements(df)
    assert list(gaps["image"]) == ["a.jpg", "b.jpg"]
    assert list(gaps["gap"]) == [40.0, -5.0]
    assert set(gaps["decoder"]) == {"inject"}  # no ResNet attention model to pair with


def test_tables_latency_from_bench_json(tiny_world, tmp_path):
    src = tiny_world.models / "resnet50-attention"
    dst = tmp_path / "resnet50-attention"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train_state"))
    keys = ("encode_ms", "decode_ms", "total_ms")
    beams = {b: {k: {"p50": 10.0 * int(b), "p90": 12.0 * int(b)} for k in keys} for b in "135"}
    (dst / "bench.json").write_text(
        json.dumps({"precision": "bf16", "beams": beams, "throughput_img_s": 7.5})
    )
    (bundle,) = list_bundles(tmp_path)
    lat = tables.latency_table([bundle])
    row = lat.iloc[0]
    assert row["status"] == "bf16" and row["beam 5 p90 ms"] == 60.0
    assert row["encode p50 ms"] == 30.0 and row["images / s"] == 7.5
    missing = tables.latency_table(list_bundles(tiny_world.models))
    assert set(missing["status"]) == {"not benchmarked"}


def test_tables_corpus_metrics_and_history(tiny_world):
    bundles = list_bundles(tiny_world.models)
    wide = tables.corpus_metrics(bundles, "test")
    assert list(wide["model"]) == MODEL_ORDER and set(wide["beam"]) == {3}
    long = tables.metrics_long(wide)
    assert set(long["label"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "METEOR"}
    fig = charts.metrics_bars(long, charts.model_colors([]), title="t")
    assert "METEOR" not in fig.data[0].x  # null for every model in the tiny world
    hist = tables.read_history(bundles)
    assert set(hist["model"]) == set(MODEL_ORDER) and hist["epoch"].max() >= 1
    summary = tables.training_summary(hist, bundles)
    assert list(summary["model"]) == MODEL_ORDER


def test_model_colors_group_by_encoder():
    colors = charts.model_colors([("r-i", "resnet50", "inject"), ("v-a", "vgg16", "attention"),
                                  ("x", "resnet50-tv", "merge")])  # fmt: skip
    assert colors["r-i"] in charts.FAMILY_SHADES["resnet"]
    assert colors["v-a"] in charts.FAMILY_SHADES["vgg"]
    assert colors["x"] in charts.FALLBACK


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


# ---------------------------------------------------------------- hostile uploads, limits, layout


def test_caption_page_hostile_uploads_end_in_a_caption_or_a_message(app):
    at = open_page(app, "caption")
    at.segmented_control(key="caption-source").set_value("upload").run()
    for name, data, expect in hostile.hostile_uploads():
        at.file_uploader(key="caption-upload").set_value((name, data, "image/jpeg")).run()
        assert_clean(at)
        errors = [e.value for e in at.error]
        if expect == "caption":
            assert not errors, (name, errors)
            assert caption_text(at).startswith("“") and len(caption_text(at)) > 2, name
        else:
            assert len(errors) == 1, (name, errors)
            assert errors[0].startswith(f"{name}: ") and expect in errors[0], errors[0]
            assert not at.main.get("metric"), name  # nothing was captioned
    at.segmented_control(key="caption-source").set_value("sample").run()  # still serving
    assert_clean(at)
    assert not at.error and caption_text(at).startswith("“")


def test_caption_page_draws_only_the_shown_word_until_asked(app):
    at = open_page(app, "caption")
    words = [s for s in at.select_slider if s.label == "Word"]
    n_words = len(words[0].options) if words else 1
    assert len(at.image) == 2  # the photo and the overlay of the word shown
    at.toggle(key="caption-all-words").set_value(True).run()
    assert_clean(at)
    assert len(at.image) == 2 + n_words


def test_inference_slots_bound_concurrency():
    lock, active, peak = threading.Lock(), [0], [0]

    def work() -> None:
        with limits.inference_slot():
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
    assert limits.cpu_cores() >= limits.SLOTS


def _bundle(encoder: str, decoder: str, suffix: str = "") -> BundleInfo:
    name = f"{encoder}-{decoder}{suffix}"
    return BundleInfo(name, Path(name), encoder, decoder, {})


def test_default_model_is_the_best_dev_cider_d(tiny_world):
    from captioning.bundle import reports

    bundles = list_bundles(tiny_world.models)
    dev = {b.name: reports.default_summary(b, "dev")["cider"] for b in bundles}
    assert len(set(dev.values())) > 1  # the tiny models differ, so the choice means something
    assert tables.default_model(bundles).name == max(dev, key=dev.get)
    unscored = [_bundle("resnet50", "inject"), _bundle("vgg16", "attention")]
    assert tables.default_model(unscored).name == "vgg16-attention"  # then attention first
    assert tables.default_model([*unscored, *bundles]).name == max(dev, key=dev.get)


def test_model_grid_lines_up_decoders_across_encoders():
    six = [_bundle(e, d) for d in ("attention", "merge", "inject") for e in ("vgg16", "resnet50")]
    grid = components.model_grid(six)
    assert [(enc, [b.decoder for b in cells]) for enc, cells in grid] == [
        ("resnet50", ["inject", "merge", "attention"]),
        ("vgg16", ["inject", "merge", "attention"]),
    ]
    gap = components.model_grid([_bundle("resnet50", "inject"), _bundle("vgg16", "attention"),
                                 _bundle("resnet50", "attention")])  # fmt: skip
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
    assert tables.pretty_encoder_group("resnet50+layer4") == "ResNet50 encoder, layer4 fine-tuned"
    twice = components.model_grid(
        [_bundle("vgg16", "attention"), _bundle("vgg16", "attention", "2")]
    )
    assert [len(cells) for _, cells in twice] == [2]


def test_compare_page_groups_six_models_by_encoder(app, tiny_world, tmp_path, monkeypatch):
    models = tmp_path / "models"
    for name in MODEL_ORDER:
        shutil.copytree(tiny_world.models / name, models / name,
                        ignore=shutil.ignore_patterns("train_state"))  # fmt: skip
    for encoder in ("resnet50", "vgg16"):  # stand-ins for the merge bundles
        shutil.copytree(models / f"{encoder}-inject", models / f"{encoder}-merge")
        cfg = json.loads((models / f"{encoder}-merge" / "config.json").read_text())
        (models / f"{encoder}-merge" / "config.json").write_text(
            json.dumps({**cfg, "decoder": "merge"})
        )
    monkeypatch.setenv("CAPTIONING_MODELS", str(models))
    at = open_page(app, "compare")
    keys = [b.key for b in at.container if (b.key or "").startswith("compare-model-")]
    assert keys == [f"compare-model-{e}-{d}" for e in ("resnet50", "vgg16")
                    for d in ("inject", "merge", "attention")]  # fmt: skip
    assert [m.value for m in at.markdown if m.value.endswith(" encoder")] == [
        "##### ResNet50 encoder",
        "##### VGG16 encoder",
    ]


def test_an_ensemble_gets_its_own_row_and_every_page_takes_it(app, tiny_world, tmp_path,
                                                              monkeypatch):  # fmt: skip
    from captioning.bundle.ensemble import make_ensemble
    from captioning.inference.evaluate import evaluate, save_evaluation

    models = tmp_path / "models"
    shutil.copytree(tiny_world.models, models, ignore=shutil.ignore_patterns("train_state"))
    make_ensemble(models / "ens", ("resnet50-attention", "vgg16-attention"))
    ens = Captioner.load(models / "ens", precision="fp32")
    ds = load_flickr8k(tiny_world.data)
    for split in ("dev", "test"):
        save_evaluation(evaluate(ens, ds, split, 3, cache_root=tiny_world.cache, meteor=False),
                        models / "ens")  # fmt: skip
    monkeypatch.setenv("CAPTIONING_MODELS", str(models))
    at = open_page(app, "compare")
    upload(at, "compare", "chelsea.jpg", SAMPLE.read_bytes())
    assert_clean(at)
    keys = [b.key for b in at.container if (b.key or "").startswith("compare-model-")]
    assert keys == [f"compare-model-{name}" for name in (*MODEL_ORDER, "ens")]
    card = at.main.get_by_key("compare-model-ens")
    assert any(m.value.startswith("#### ") for m in card.markdown)
    assert "##### Ensembles of ResNet50 + VGG16" in [m.value for m in at.markdown]
    for page in ("training", "explore"):
        assert_clean(open_page(AppTest.from_file(str(APP), default_timeout=120), page))
    at = open_page(AppTest.from_file(str(APP), default_timeout=120), "caption")
    at.selectbox(key="caption-model").set_value("ens").run()
    assert_clean(at)
    assert "member resnet50-attention looked while the ensemble wrote" in texts(at)


def test_explore_page_shows_diversity_beside_bleu_and_cider(app):
    at = open_page(app, "explore")
    assert at.segmented_control(key="explore-summary-split").value == "test"
    for split in ("test", "dev"):
        at.segmented_control(key="explore-summary-split").set_value(split).run()
        assert_clean(at)
        summary = frame(at, "distinct").value
        assert list(summary.columns) == ["model", "beam", "bleu4", "cider", "distinct",
                                         "repeat_trigram"]  # fmt: skip
        assert list(summary["model"]) == MODEL_ORDER
        assert summary[["bleu4", "cider", "distinct", "repeat_trigram"]].notna().all().all()
        preds = frame(at, "caption").value
        for _, row in summary.iterrows():  # distinct % matches the captions actually written
            caps = preds.loc[(preds["model"] == row["model"]) & (preds["split"] == split)]
            expected = 100 * caps["caption"].str.lower().nunique() / len(caps)
            assert row["distinct"] == pytest.approx(expected, abs=0.01)
        assert f"Each model on the **{split}** split" in texts(at)


def test_attention_fit_never_copies_at_full_size():
    big = Image.new("L", (6000, 4000), 128)
    small = attention.fit(big, 300)
    assert small.size == (300, 200) and small.mode == "RGB"
    tiny = Image.new("RGB", (50, 40))
    assert attention.fit(tiny, 300).size == (50, 40) and attention.fit(tiny, 300) is not tiny


def test_history_of_an_scst_bundle_shows_both_stages(tiny_world, tmp_path):
    """XE epochs (no stage field, as before SCST) then SCST epochs with a raw reward."""
    src = next(b for b in list_bundles(tiny_world.models) if b.decoder == "attention")
    bundle = tmp_path / "m-scst"
    shutil.copytree(src.path, bundle)
    xe = [{"epoch": e, "train_loss": 3.0 - e / 10, "dev_cider": 40.0 + e} for e in (1, 2)]
    scst = [{"stage": "scst", "epoch": 3, "stage_epoch": 1, "reward": 0.61, "dev_cider": 47.5}]
    (bundle / "history.json").write_text(json.dumps(xe + scst))
    (info,) = list_bundles(tmp_path)
    hist = tables.read_history([info])
    assert list(hist["stage"]) == ["xe", "xe", "scst"]
    assert hist["reward"].iloc[2] == pytest.approx(61.0) and hist["reward"].iloc[:2].isna().all()
    fig = charts.history_chart(hist, {"dev_cider": "dev CIDEr-D"}, {}, title="t", ytitle="y")
    assert list(fig.data[0].marker.symbol) == ["circle", "circle", "diamond"]
    summary = tables.training_summary(hist, [info])
    assert summary["stages"].iloc[0] == "2 xe + 1 scst"


def test_history_of_a_finetuned_warm_start_marks_its_stage(tiny_world, tmp_path):
    """``train --init B --finetune …``: B's xe epochs, then squares for the fine-tuning ones."""
    src = next(b for b in list_bundles(tiny_world.models) if b.decoder == "attention")
    bundle = tmp_path / "m-ft"
    shutil.copytree(src.path, bundle)
    rows = [{"stage": "xe", "epoch": 1, "dev_cider": 40.0}, {"stage": "xe", "epoch": 2,
            "dev_cider": 42.0}, {"stage": "finetune", "epoch": 3, "stage_epoch": 1,
            "dev_cider": 45.0}]  # fmt: skip
    (bundle / "history.json").write_text(json.dumps(rows))
    (info,) = list_bundles(tmp_path)
    hist = tables.read_history([info])
    fig = charts.history_chart(hist, {"dev_cider": "dev CIDEr-D"}, {}, title="t", ytitle="y")
    assert list(fig.data[0].marker.symbol) == ["circle", "circle", "square"]
    assert tables.training_summary(hist, [info])["stages"].iloc[0] == "2 xe + 1 finetune"
    # a run that tuned its block from the start (no stage field): all its epochs fine-tune
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["train_config"]["finetune"] = "layer4"
    (bundle / "config.json").write_text(json.dumps(cfg))
    (bundle / "history.json").write_text(json.dumps([{"epoch": 1, "dev_cider": 40.0}]))
    (info,) = list_bundles(tmp_path)
    assert list(tables.read_history([info])["stage"]) == ["finetune"]


def test_a_soups_history_is_a_line_per_member_in_tints_of_its_colour(tiny_world, tmp_path):
    """A soup's ``history.json`` (``captioning.soup``): its members' epochs, each tagged."""
    src = next(b for b in list_bundles(tiny_world.models) if b.decoder == "attention")
    bundle = tmp_path / "soup"
    shutil.copytree(src.path, bundle)
    rows = [{"epoch": e, "dev_cider": 40.0 + e + k, "member": m}
            for k, m in enumerate(("a", "b")) for e in (1, 2)]  # fmt: skip
    (bundle / "history.json").write_text(json.dumps(rows))
    (info,) = list_bundles(tmp_path)
    hist = tables.read_history([info])
    assert list(dict.fromkeys(hist["model"])) == ["soup · a", "soup · b"]
    hist.loc[hist["model"] == "soup · a", "dev_bleu4"] = [20.0, 10.0]  # BLEU-4 best at epoch 1
    summary = tables.training_summary(hist, [info]).set_index("model")
    assert summary.loc["soup · a", "best epoch"] == 2  # a member's best: its best dev CIDEr-D
    assert summary.loc["soup · a", "dev CIDEr-D"] == 42.0
    colors = {"soup": "#1F5A96"}
    fig = charts.history_chart(hist, {"dev_cider": "dev CIDEr-D"}, colors, title="t", ytitle="y")
    assert [t.name for t in fig.data] == ["soup · a", "soup · b"]
    first, second = (t.line.color for t in fig.data)
    assert first == "#1F5A96" and second != first  # the soup's colour, then a lighter tint
    assert all(int(second[i : i + 2], 16) > int(first[i : i + 2], 16) for i in (1, 3, 5))
