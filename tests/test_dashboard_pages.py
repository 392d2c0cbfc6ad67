"""The dashboard's pages through Streamlit's AppTest (no browser: ``tests/test_browser.py``).

Fast tests run the Training and Explore pages, which load no model, on small exported bundles
(``tests.test_reports.make_bundle``), and every page on an empty models folder. Tests on the tiny
world (synthetic Flickr8k and four tiny trained bundles) caption real photos and are slow: the
world is trained once per session, and captioners are cached per process
(``st.cache_resource``), so only the first test that captions pays for loading them.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from captioning.bundle import reports
from captioning.bundle.catalog import list_bundles
from captioning.bundle.soup import make_soup
from captioning.data import load_flickr8k
from captioning.inference.captioner import Captioner
from dashboard import charts
from tests import hostile
from tests.test_reports import SCORES, make_bundle, record, setting, write_history

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboard" / "app.py"
PAGES_DIR = REPO / "dashboard" / "app_pages"
SAMPLE = REPO / "artifacts" / "samples" / "chelsea.jpg"
MODEL_ORDER = ["resnet50-inject", "resnet50-attention", "vgg16-inject", "vgg16-attention"]
PAGES = ("caption", "compare", "training", "explore")


def new_app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=120)


def page_alone(page: str) -> AppTest:
    """One page run on its own, run once (the app would first run the Caption page, which
    loads the models to caption a sample photo)."""
    at = AppTest.from_file(str(PAGES_DIR / f"{page}.py"), default_timeout=120).run()
    assert_clean(at)
    return at


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


def figures(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def model_captions(at: AppTest) -> list[tuple[str, str]]:
    """Explore's list of every model's caption of the image shown: (model label, caption)."""
    out = []
    for m in at.main.get_by_key("explore-captions").markdown:
        head, caption = m.value.split("  \n")
        label = head.split("**")[1].replace("\\", "")  # the bold model label, unescaped
        out.append((label, caption))
    return out


def values(array: list | dict) -> list:
    """A Plotly JSON array as a list: plain, or typed (``{"dtype", "bdata"}``, base64)."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def select_row(at: AppTest, table) -> None:
    at.session_state[table.key] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert_clean(at)


# ---------------------------------------------------------------- fast: small exported bundles


@pytest.fixture
def small_models(tmp_path, monkeypatch) -> Path:
    """Four exported bundles with records, predictions and two-epoch histories, and a data
    folder that does not exist, set in the environment."""
    models = tmp_path / "models"
    for k, name in enumerate(reversed(MODEL_ORDER)):
        encoder, decoder = name.split("-")
        b = make_bundle(models, name, encoder=encoder, decoder=decoder)
        record(b, setting(split="dev"), images=("d.jpg",), bleu=10.0 * k)
        record(b, setting(), scores={**SCORES, "cider": 40.0 + k}, bleu=20.0 + 10.0 * k)
        epochs = [
            {
                "epoch": e,
                "train_loss": 3.0 - e,
                "dev_loss": 3.5 - e,
                "dev_bleu4": 10.0 + e,
                "dev_cider": 30.0 + e + k,
                "lr": 1e-3 / e,
            }
            for e in (1, 2)
        ]
        write_history(b, epochs, best_epoch=2)
    monkeypatch.setenv("CAPTIONING_MODELS", str(models))
    monkeypatch.setenv("CAPTIONING_DATA", str(tmp_path / "no-data-here"))
    return models


@pytest.mark.parametrize("page", PAGES)
def test_empty_models_dir_shows_how_to_train(monkeypatch, tmp_path, page):
    monkeypatch.setenv("CAPTIONING_MODELS", str(tmp_path / "no-models-here"))
    at = open_page(new_app(), page)
    assert "No trained models yet" in texts(at)
    assert "python -m captioning train" in texts(at)
    assert str(tmp_path / "no-models-here") in texts(at)


def test_training_page_draws_every_line_and_its_summary(small_models):
    at = page_alone("training")
    figs = figures(at)
    assert len(figs) == 4
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert titles[0].startswith("Loss") and titles[1] == "Dev corpus BLEU-4 (greedy)"
    assert {t["name"] for t in figs[0]["data"]} == set(MODEL_ORDER)
    summary = frame(at, "best epoch").value
    assert list(summary["model"]) == MODEL_ORDER and set(summary["best epoch"]) == {2}
    assert list(summary["dev CIDEr-D"]) == [35.0, 34.0, 33.0, 32.0]
    at.multiselect(key="training-models").set_value(["vgg16-attention"]).run()
    assert_clean(at)
    assert {t["name"] for t in figures(at)[1]["data"]} == {"vgg16-attention"}
    assert list(frame(at, "best epoch").value["model"]) == ["vgg16-attention"]
    at.multiselect(key="training-models").set_value([]).run()
    assert_clean(at)
    assert not at.get("plotly_chart") and "Select at least one bundle." in texts(at)
    assert at.toggle(key="training-members").disabled  # no soup among the bundles


def test_training_page_draws_a_soup_as_one_line_and_its_members_on_demand(small_models):
    runs = small_models.parent / "runs"
    for k, name in enumerate(("run-a", "run-b")):
        make_bundle(runs, name, decoder="attention")
        rows = [{"epoch": e, "dev_cider": 40.0 + e + 2 * k, "train_loss": 2.0} for e in (1, 2)]
        write_history(runs / name, rows, best_epoch=2)
    make_soup(small_models / "resnet50-soup", [str(runs / "run-a"), str(runs / "run-b")])
    at = page_alone("training")
    assert not at.toggle(key="training-members").disabled
    names = {t["name"] for t in figures(at)[0]["data"]}
    assert names == {*MODEL_ORDER, "resnet50-soup"}
    cider = next(t for t in figures(at)[2]["data"] if t["name"] == "resnet50-soup")
    assert values(cider["y"]) == [42.0, 43.0]  # the mean of its two runs
    summary = frame(at, "best epoch").value.set_index("model")
    assert summary.loc["resnet50-soup", "stages"] == "soup of 2 runs"
    assert len(summary) == len(MODEL_ORDER) + 1
    at.toggle(key="training-members").set_value(True).run()
    assert_clean(at)
    members = {"resnet50-soup · run-a", "resnet50-soup · run-b"}
    assert {t["name"] for t in figures(at)[0]["data"]} == {*MODEL_ORDER, *members}
    assert set(frame(at, "best epoch").value["model"]) == {*MODEL_ORDER, *members}
    key = next(m.value for m in at.markdown if charts.KEY_CLASS in m.value)
    assert key.count(f"class='{charts.KEY_CLASS}'") == len(MODEL_ORDER) + 2


def test_explore_page_filters_and_scores_without_the_data_set(small_models):
    at = page_alone("explore")
    assert "export CAPTIONING_DATA=/path/to/flickr8k" in texts(at)  # the tables still work
    assert "no-data-here" in texts(at)  # and why the folder set is unusable
    table = frame(at, "caption").value
    assert len(table) == 12 and set(table["split"]) == {"dev", "test"}
    at.slider(key="explore-range").set_value((25.0, 100.0)).run()
    assert_clean(at)
    kept = frame(at, "caption").value
    assert 0 < len(kept) < len(table) and (kept["bleu4"] >= 25.0).all()
    assert kept["bleu4"].is_monotonic_decreasing
    at.segmented_control(key="explore-order").set_value(1).run()
    assert "Smoothed sentence BLEU-1 range" in [s.label for s in at.slider]
    at.multiselect(key="explore-models").set_value(["vgg16-attention"]).run()
    assert set(frame(at, "caption").value["model"]) <= {"vgg16-attention"}
    summary = frame(at, "distinct").value
    assert list(summary["model"]) == MODEL_ORDER and list(summary["distinct"]) == [50.0] * 4
    assert at.segmented_control(key="explore-summary-split").value == "test"
    assert "explore-confidence" not in [s.key for s in at.slider]  # no file records one
    assert not any(o.startswith("confidence") for o in at.selectbox(key="explore-sort").options)


def test_explore_page_filters_and_sorts_by_confidence_when_the_files_have_it(
    small_models, monkeypatch
):
    if "confidence" not in reports.PREDICTION_FLOATS:  # the library reads the column
        monkeypatch.setattr(
            reports, "PREDICTION_FLOATS", (*reports.PREDICTION_FLOATS, "confidence")
        )
    for k, csv in enumerate(sorted(small_models.glob("*/predictions_*.csv"))):
        lines = csv.read_text().splitlines()
        rows = [f"{line},{(k + i) % 10 / 10}" for i, line in enumerate(lines[1:])]
        csv.write_text("\n".join([lines[0] + ",confidence", *rows]) + "\n")
    at = page_alone("explore")
    table = frame(at, "caption").value
    assert table["confidence"].notna().all() and len(table) == 12
    at.selectbox(key="explore-sort").set_value("confidence, high to low").run()
    assert_clean(at)
    assert frame(at, "caption").value["confidence"].is_monotonic_decreasing
    at.slider(key="explore-confidence").set_value((0.5, 1.0)).run()
    assert_clean(at)
    kept = frame(at, "caption").value
    assert 0 < len(kept) < len(table) and (kept["confidence"] >= 0.5).all()


def test_explore_page_row_selection_without_the_data_set(small_models):
    at = page_alone("explore")
    table = frame(at, "caption")
    first = table.value.iloc[0]
    select_row(at, table)
    assert f"##### {first['image']} · {first['split']} split" in texts(at)
    assert "Set `CAPTIONING_DATA` to see the image" in texts(at)
    captions = model_captions(at)  # every model's caption, from the predictions files
    assert [model for model, _ in captions] == MODEL_ORDER
    assert all(caption == "“a dog”" for _, caption in captions)


def test_explore_page_disagreements_name_both_models_of_each_pair(small_models):
    at = page_alone("explore")
    cards = [c for c in at.container if (c.key or "").startswith("gap-pair-")]
    assert len(cards) == 2  # the inject and the attention pair of the dev image (dev first)
    for card in cards:
        text = "\n".join(m.value for m in card.markdown)
        decoder = "inject" if "inject decoder" in text else "attention"
        assert f"resnet50-{decoder}" in text and f"vgg16-{decoder}" in text
        assert "gap **+20.0**" in text
    at.button(key=cards[0].key.replace("gap-pair-", "gap-show-")).click().run()
    assert_clean(at)
    assert "Set `CAPTIONING_DATA` to see the image" in texts(at)
    assert [m for m, _ in model_captions(at)] == MODEL_ORDER  # every model's caption of it


# ---------------------------------------------------------------- slow: the tiny world


@pytest.fixture
def app(tiny_world, monkeypatch) -> AppTest:
    """The app on the tiny world (data set and four bundles), not yet run."""
    monkeypatch.setenv("CAPTIONING_DATA", str(tiny_world.data))
    monkeypatch.setenv("CAPTIONING_MODELS", str(tiny_world.models))
    monkeypatch.setenv("CAPTIONING_CACHE", str(tiny_world.cache))
    return new_app()


def caption_text(at: AppTest) -> str:
    block = at.main.get_by_key("caption-result")
    return block.subheader[0].value


def upload(at: AppTest, page: str, name: str, data: bytes, mime: str = "image/jpeg") -> AppTest:
    at.segmented_control(key=f"{page}-source").set_value("upload").run()
    at.file_uploader(key=f"{page}-upload").upload(name, data, mime).run()
    return at


@pytest.mark.slow
def test_caption_page_opens_on_the_best_dev_model_and_captions_the_sample(app, tiny_world):
    at = open_page(app, "caption")
    assert at.title[0].value == "Caption a photo"
    assert caption_text(at).startswith("“")
    labels = [m.label for m in at.metric]
    assert {"Encode", "Decode", "Confidence", "Log-prob"} <= set(labels)
    assert all(m.value.endswith(" ms") for m in at.metric if m.label in ("Encode", "Decode"))
    nbest = at.table[0].value
    assert list(nbest.columns) == ["#", "caption", "log-prob", "per token"]
    bundles = list_bundles(tiny_world.models)
    dev = {b.name: reports.default_summary(b, "dev")["cider"] for b in bundles}
    assert len(set(dev.values())) > 1  # the tiny models differ, so the choice means something
    assert at.selectbox(key="caption-model").value == max(dev, key=dev.get)
    assert reports.best_single_bundle(bundles).name == max(dev, key=dev.get)
    assert "Where the model looks" in [s.value for s in at.subheader]
    assert len(at.image) >= 2  # the photo and its attention overlay


@pytest.mark.slow
def test_caption_page_upload_real_photo(app):
    at = open_page(app, "caption")
    upload(at, "caption", "chelsea.jpg", SAMPLE.read_bytes())
    assert_clean(at)
    assert not at.error
    text = caption_text(at)
    assert text.startswith("“") and len(text) > 2
    assert "chelsea.jpg" in [c for img in at.image for c in img.captions]


@pytest.mark.slow
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


@pytest.mark.slow
def test_caption_page_beam_and_model_without_attention(app):
    at = open_page(app, "caption")
    at.selectbox(key="caption-model").set_value("vgg16-inject").run()
    at.slider(key="caption-beam").set_value(1).run()
    assert_clean(at)
    assert caption_text(at).startswith("“")
    assert len(at.table[0].value) == 1  # greedy: a single hypothesis
    assert "Where the model looks" not in [s.value for s in at.subheader]
    assert "has no attention" in texts(at)


@pytest.mark.slow
def test_caption_page_attention_word_slider(app):
    at = open_page(app, "caption")
    at.selectbox(key="caption-model").set_value("resnet50-attention").run()
    upload(at, "caption", "chelsea.jpg", SAMPLE.read_bytes())
    sliders = [s for s in at.select_slider if s.label == "Word"]
    if not sliders:
        pytest.skip("the tiny model's caption of this photo has a single word")
    n = len(sliders[0].options)  # the options are word indices, shown as "k. word"
    sliders[0].set_value(n - 1).run()
    assert_clean(at)
    assert f"word {n} of {n}" in texts(at)


@pytest.mark.slow
def test_caption_page_draws_only_the_shown_word_until_asked(app):
    at = open_page(app, "caption")
    at.selectbox(key="caption-model").set_value("resnet50-attention").run()
    words = [s for s in at.select_slider if s.label == "Word"]
    n_words = len(words[0].options) if words else 1
    assert len(at.image) == 2  # the photo and the overlay of the word shown
    at.toggle(key="caption-all-words").set_value(True).run()
    assert_clean(at)
    assert len(at.image) == 2 + n_words


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_compare_page_dataset_image_shows_references_and_scores(app):
    at = open_page(app, "compare")
    at.segmented_control(key="compare-source").set_value("dataset").run()
    assert_clean(at)
    assert "Reference captions" in texts(at)
    refs = [m.value for m in at.markdown if m.value.startswith("1. ")]
    assert refs and refs[0].count("\n") >= 1
    assert texts(at).count("smoothed sentence BLEU-4") == len(MODEL_ORDER)
    at.selectbox(key="compare-split").set_value("test").run()
    assert_clean(at)


@pytest.mark.slow
def test_compare_page_metrics_chart_and_latency(app):
    at = open_page(app, "compare")
    figs = figures(at)
    assert len(figs) == 1
    assert "corpus BLEU (test split, beam 3)" in figs[0]["layout"]["title"]["text"]
    assert [t["name"] for t in figs[0]["data"]] == MODEL_ORDER
    assert figs[0]["data"][0]["x"][:4] == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
    latency = at.dataframe[-1].value
    assert set(latency["precision"]) == {"not benchmarked"}


@pytest.mark.slow
def test_compare_dataset_source_without_data_dir(app, monkeypatch):
    monkeypatch.delenv("CAPTIONING_DATA")
    at = open_page(app, "compare")
    at.segmented_control(key="compare-source").set_value("dataset").run()
    assert_clean(at)
    assert "export CAPTIONING_DATA=/path/to/flickr8k" in texts(at)


@pytest.mark.slow
def test_compare_page_groups_six_models_by_encoder(app, tiny_world, tmp_path, monkeypatch):
    models = tmp_path / "models"
    for name in MODEL_ORDER:
        shutil.copytree(
            tiny_world.models / name, models / name, ignore=shutil.ignore_patterns("train_state")
        )
    for encoder in ("resnet50", "vgg16"):  # stand-ins for the merge bundles
        shutil.copytree(models / f"{encoder}-inject", models / f"{encoder}-merge")
        cfg = json.loads((models / f"{encoder}-merge" / "config.json").read_text())
        (models / f"{encoder}-merge" / "config.json").write_text(
            json.dumps({**cfg, "decoder": "merge"})
        )
    monkeypatch.setenv("CAPTIONING_MODELS", str(models))
    at = open_page(app, "compare")
    keys = [b.key for b in at.container if (b.key or "").startswith("compare-model-")]
    assert keys == [
        f"compare-model-{e}-{d}"
        for e in ("resnet50", "vgg16")
        for d in ("inject", "merge", "attention")
    ]
    assert [m.value for m in at.markdown if m.value.endswith(" encoder")] == [
        "##### ResNet50 encoder",
        "##### VGG16 encoder",
    ]


@pytest.mark.slow
def test_an_ensemble_gets_its_own_row_and_every_page_takes_it(
    app, tiny_world, tmp_path, monkeypatch
):
    from captioning.bundle.ensemble import make_ensemble
    from captioning.inference.evaluate import evaluate, save_evaluation

    models = tmp_path / "models"
    shutil.copytree(tiny_world.models, models, ignore=shutil.ignore_patterns("train_state"))
    make_ensemble(models / "ens", ("resnet50-attention", "vgg16-attention"))
    ens = Captioner.load(models / "ens", precision="fp32", runtime="torch")
    ds = load_flickr8k(tiny_world.data)
    for split in ("dev", "test"):
        save_evaluation(
            evaluate(ens, ds, split, 3, cache_root=tiny_world.cache, meteor=False), models / "ens"
        )
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
        assert_clean(open_page(new_app(), page))
    at = open_page(new_app(), "caption")
    at.selectbox(key="caption-model").set_value("ens").run()
    assert_clean(at)
    assert "member resnet50-attention looked while the ensemble wrote" in texts(at)


@pytest.mark.slow
def test_training_page_charts_and_the_recorded_best_epochs(app, tiny_world):
    at = open_page(app, "training")
    figs = figures(at)
    assert len(figs) == 4
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert titles[0].startswith("Loss") and "BLEU-4" in titles[1] and "CIDEr" in titles[2]
    assert {t["name"] for t in figs[0]["data"]} == set(MODEL_ORDER)
    summary = frame(at, "best epoch").value
    recorded = {b.name: b.config["best_epoch"] for b in list_bundles(tiny_world.models)}
    assert dict(zip(summary["model"], summary["best epoch"], strict=True)) == recorded


@pytest.mark.slow
def test_explore_page_with_the_data_set_shows_the_image_and_its_references(app):
    at = open_page(app, "explore")
    table = frame(at, "caption")
    first = table.value.iloc[0]
    select_row(at, table)
    assert f"##### {first['image']} · {first['split']} split" in texts(at)
    assert "Reference captions" in texts(at)
    assert len(at.image) == 1
    assert set(MODEL_ORDER) <= {m.split(" (")[0] for m, _ in model_captions(at)}


@pytest.mark.slow
def test_explore_page_shows_diversity_beside_bleu_and_cider(app):
    at = open_page(app, "explore")
    assert at.segmented_control(key="explore-summary-split").value == "test"
    for split in ("test", "dev"):
        at.segmented_control(key="explore-summary-split").set_value(split).run()
        assert_clean(at)
        summary = frame(at, "distinct").value
        assert list(summary.columns) == [
            "model",
            "beam",
            "bleu4",
            "cider",
            "distinct",
            "repeat_trigram",
        ]
        assert list(summary["model"]) == MODEL_ORDER
        assert summary[["bleu4", "cider", "distinct", "repeat_trigram"]].notna().all().all()
        preds = frame(at, "caption").value
        for _, row in summary.iterrows():  # distinct % matches the captions actually written
            caps = preds.loc[(preds["model"] == row["model"]) & (preds["split"] == split)]
            expected = 100 * caps["caption"].str.lower().nunique() / len(caps)
            assert row["distinct"] == pytest.approx(expected, abs=0.01)
        assert f"Each model on the **{split}** split" in texts(at)
