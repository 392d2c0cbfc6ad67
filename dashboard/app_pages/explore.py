"""Explore page: every model's dev/test predictions, filterable, with per-image details."""

from __future__ import annotations

import hashlib

import pandas as pd
import streamlit as st

from captioning.data import CaptionDataset
from captioning.models.metrics import METRIC_LABELS
from dashboard import components, state, tables

SPLITS = ("dev", "test")

st.title("Explore predictions", anchor=False)
st.markdown(
    "Every model's caption of every dev and test image, from the bundles' predictions files. "
    "Per-image scores are **smoothed sentence BLEU** against the image's references: good for "
    "browsing and ranking, not comparable with the corpus BLEU on Compare and Training."
)

bundles = components.require_bundles()
preds = state.predictions()
if preds.empty:
    st.info(
        "No predictions yet. Write them with "
        "`python -m captioning evaluate --model NAME --split dev --record` (and `--split test`).",
        icon=":material/table_view:",
    )
    st.stop()
status = state.dataset()
ds = status.dataset
if ds is None:
    components.data_note(status.message, "Without it the tables below still work.")


def bleu_label(order: int) -> str:
    return f"smoothed sentence BLEU-{order}"


def detail(frame: pd.DataFrame, image: str, split: str, dataset: CaptionDataset | None) -> None:
    """The image, its references and every model's caption of it (on ``split``)."""
    st.markdown(f"##### {image} · {split} split")
    pic, text = st.columns([2, 3], gap="large")
    with pic:
        if dataset is None:
            st.caption("Set `CAPTIONING_DATA` to see the image (see the note above).")
        else:
            path = dataset.image_path(image)
            if path.is_file():
                st.image(str(path), width="stretch")
            else:
                st.caption(f"{path} is missing.")
    with text:
        if dataset is not None:
            st.markdown("**Reference captions**")
            components.references_list(list(dataset.captions.get(image, [])))
        st.markdown("**Model captions**")
        rows = tables.captions_for_image(frame, image, split)
        many_beams = rows["beam"].nunique() > 1
        shown = pd.DataFrame(
            {
                "model": [
                    f"{m} (beam {b})" if many_beams else m
                    for m, b in zip(rows["model"], rows["beam"], strict=True)
                ],
                "caption": rows["caption"],
                bleu_label(4): rows["bleu4"].map("{:.1f}".format),
                "log-prob": rows["logprob"].map("{:.2f}".format),
            }
        )
        st.table(shown.set_index("model"))


def table_key(prefix: str, *parts: object) -> str:
    """A widget key that changes with the filters, so a stale row selection is dropped."""
    return f"{prefix}-{hashlib.sha1(repr(parts).encode()).hexdigest()[:10]}"


scored = [s for s in SPLITS if not tables.corpus_metrics(bundles, s).empty]
if scored:
    st.subheader("Scores and diversity", anchor=False)
    table_col, note_col = st.columns([3, 2], gap="large")
    summary_split = table_col.segmented_control(
        "Split",
        scored,
        default=scored[-1],
        required=True,
        key="explore-summary-split",
        label_visibility="collapsed",
    )
    table_col.dataframe(
        state.scores(summary_split),
        hide_index=True,
        placeholder="n/a",
        column_config={
            "beam": st.column_config.NumberColumn("beam", format="%d"),
            **{
                k: st.column_config.NumberColumn(METRIC_LABELS[k], format="%.1f")
                for k in tables.SUMMARY_METRICS
            },
        },
    )
    note_col.markdown(
        f"Each model on the **{summary_split}** split at its default decoding.\n\n"
        "- **BLEU-4** and **CIDEr-D**: corpus scores (0–100).\n"
        "- **Distinct %**: different captions per 100 images; a model that gives many photos "
        "the same sentence scores low.\n"
        "- **Rep. trigram %**: captions that repeat a trigram (“a man and a man and …”); "
        "lower reads better."
    )

tab_all, tab_gap = st.tabs(["All predictions", "Where the models disagree"])

with tab_all:
    models = list(dict.fromkeys(preds["model"]))
    splits = [s for s in SPLITS if s in set(preds["split"])] + sorted(
        set(preds["split"]) - set(SPLITS)
    )
    f1, f2, f3 = st.columns([2, 5, 3])
    chosen_splits = f1.multiselect("Split", splits, default=splits, key="explore-splits")
    chosen_models = f2.multiselect("Model", models, default=models, key="explore-models")
    words = f3.text_input(
        "Words in the caption", key="explore-words", placeholder="e.g. dog grass"
    ).strip()
    g1, g2, g3 = st.columns([3, 4, 3], vertical_alignment="bottom")
    order = g1.segmented_control(
        "BLEU order",
        [1, 2, 3, 4],
        format_func=lambda n: f"BLEU-{n}",
        default=4,
        required=True,
        key="explore-order",
    )
    lo, hi = g2.slider(
        f"Smoothed sentence BLEU-{order} range",
        0.0,
        100.0,
        (0.0, 100.0),
        step=0.5,
        key="explore-range",
    )
    sort = g3.selectbox("Sort by", list(tables.SORTS), key="explore-sort")
    filt = tables.PredictionFilter(chosen_splits, chosen_models, order, (lo, hi), words, sort)
    rows = tables.filter_predictions(preds, filt)
    if not chosen_splits or not chosen_models:
        rows = rows.iloc[0:0]
    st.caption(
        f"{len(rows)} of {len(preds)} predictions · score = {bleu_label(order)} · "
        "select a row to see the image, its references and every model's caption."
    )
    score = f"bleu{order}"
    others = [c for c in tables.BLEU_COLUMNS if c != score]
    beam_cols = ["beam"] if preds["beam"].nunique() > 1 else []
    event = st.dataframe(
        rows,
        hide_index=True,
        height=380,
        column_order=["image", "split", "model", *beam_cols, "caption", score, "logprob", *others],
        column_config={
            "caption": st.column_config.TextColumn(width="large"),
            score: st.column_config.ProgressColumn(
                bleu_label(order), format="%.1f", min_value=0.0, max_value=100.0
            ),
            "logprob": st.column_config.NumberColumn("log-prob", format="%.2f"),
            **{
                c: st.column_config.NumberColumn(
                    f"BLEU-{c[-1]}", format="%.1f", help=bleu_label(int(c[-1]))
                )
                for c in others
            },
        },
        on_select="rerun",
        selection_mode="single-row",
        key=table_key("explore-table", filt),
    )
    selected = [r for r in event.selection.rows if r < len(rows)]
    if selected:
        row = rows.iloc[selected[0]]
        detail(preds, str(row["image"]), str(row["split"]), ds)

with tab_gap:
    st.markdown(
        "Images where a ResNet50 and a VGG16 model with the same decoder disagree most: the "
        f"largest gap in {bleu_label(4)} between their captions."
    )
    gaps = tables.disagreements(preds, order=4, top=10_000)
    if gaps.empty:
        st.info(
            "Needs predictions from a ResNet and a VGG model with the same decoder kind "
            "on the same split."
        )
    else:
        h1, h2, h3 = st.columns([2, 3, 3])
        gap_splits = sorted(set(gaps["split"]))
        gap_split = h1.selectbox("Split", gap_splits, key="gap-split")
        decoders = list(dict.fromkeys(gaps["decoder"]))
        gap_decoders = h2.multiselect("Decoder", decoders, default=decoders, key="gap-decoders")
        top = h3.slider("Show the top", 5, 100, 25, step=5, key="gap-top")
        shown = gaps[(gaps["split"] == gap_split) & gaps["decoder"].isin(gap_decoders)]
        shown = shown.head(top).reset_index(drop=True)
        gap_event = st.dataframe(
            shown,
            hide_index=True,
            column_order=[
                "image",
                "decoder",
                "resnet_caption",
                "resnet_bleu",
                "vgg_caption",
                "vgg_bleu",
                "gap",
            ],
            column_config={
                "resnet_caption": st.column_config.TextColumn("ResNet caption", width="medium"),
                "vgg_caption": st.column_config.TextColumn("VGG caption", width="medium"),
                "resnet_bleu": st.column_config.NumberColumn(
                    "ResNet BLEU-4", format="%.1f", help=bleu_label(4)
                ),
                "vgg_bleu": st.column_config.NumberColumn(
                    "VGG BLEU-4", format="%.1f", help=bleu_label(4)
                ),
                "gap": st.column_config.NumberColumn(
                    "gap", format="%+.1f", help="ResNet minus VGG, smoothed sentence BLEU-4"
                ),
            },
            on_select="rerun",
            selection_mode="single-row",
            key=table_key("gap-table", gap_split, gap_decoders, top),
        )
        picked_rows = [r for r in gap_event.selection.rows if r < len(shown)]
        if picked_rows:
            row = shown.iloc[picked_rows[0]]
            detail(preds, str(row["image"]), str(row["split"]), ds)
        else:
            st.caption("Select a row to see the image and every model's caption.")
