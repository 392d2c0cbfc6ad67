"""Explore page: every model's dev/test predictions, filterable, with per-image details."""

from __future__ import annotations

import hashlib

import pandas as pd
import streamlit as st

from captioning.data import CaptionDataset
from captioning.models.metrics import METRIC_LABELS
from dashboard import charts, components, state, tables

SPLITS = ("dev", "test")
CAPTION_WIDTH = 230  # px: the caption column wraps at this width (wider where there is room)
WRAPPED_ROW = 66  # px: rows of up to three lines (st.dataframe wraps text above 64 px)
ROWS_SHOWN = 7

st.title("Explore predictions", anchor=False)
st.markdown(
    "Every model's caption of every dev and test image, from the bundles' predictions files. "
    "Per-image scores are **smoothed sentence BLEU** against the image's references: good for "
    "browsing and ranking, not comparable with the corpus BLEU on Compare and Training."
)

bundles = components.require_bundles()
colors = charts.model_colors([b.name for b in bundles])
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


def detail(
    frame: pd.DataFrame,
    image: str,
    split: str,
    dataset: CaptionDataset | None,
    every: bool = False,
) -> None:
    """The image, its references and every model's caption of it (on ``split``): at each
    model's default decoding, or with ``every`` under each setting it was evaluated with."""
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
        rows = tables.captions_for_image(frame, image, split, default_only=not every)
        with st.container(key="explore-captions", gap="small"):
            for label, (_, r) in zip(tables.setting_labels(rows), rows.iterrows(), strict=True):
                facts = [f"sentence BLEU-4 {r['bleu4']:.1f}", f"log-prob {r['logprob']:.2f}"]
                if pd.notna(r["confidence"]):
                    facts.append(f"confidence {r['confidence']:.2f}")
                st.markdown(
                    f"{dot(str(r['model']))} **{components.escape_markdown(label)}** "
                    f":gray[· {' · '.join(facts)}]  \n"
                    f"“{components.escape_markdown(str(r['caption']))}”",
                    unsafe_allow_html=True,
                )


def dot(model: str) -> str:
    """A dot in the model's colour (HTML)."""
    return f"<span style='color:{colors.get(model, charts.FALLBACK)}'>●</span>"


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
    confident = tables.has_confidence(preds)
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
    sort = g3.selectbox("Sort by", tables.sort_options(preds), key="explore-sort")
    k1, k2, _ = st.columns([3, 4, 3], vertical_alignment="bottom")  # under order and range
    confidence = tables.FULL_CONFIDENCE
    if confident:
        confidence = k2.slider(
            "Confidence range",
            0.0,
            1.0,
            tables.FULL_CONFIDENCE,
            step=0.01,
            key="explore-confidence",
            help="How sure each model is of its caption (0–1, from its own word "
            "probabilities). The full range also keeps captions without a confidence.",
        )
    every = k1.toggle(
        "Every recorded setting",
        key="explore-every-setting",
        help="Off: each model's captions at its default decoding. On: also those of the other "
        "beams, precisions and runtimes it was evaluated with.",
    )
    filt = tables.PredictionFilter(
        chosen_splits,
        chosen_models,
        order,
        (lo, hi),
        words,
        sort,
        confidence_range=confidence,
        default_only=not every,
    )
    rows = tables.filter_predictions(preds, filt)
    if not chosen_splits or not chosen_models:
        rows = rows.iloc[0:0]
    st.caption(
        f"{len(rows)} of {len(preds)} predictions · score = {bleu_label(order)} · "
        "select a row to see the image, its references and every model's caption."
    )
    score = f"bleu{order}"
    others = [c for c in tables.BLEU_COLUMNS if c != score]
    settings = ["beam", "precision", "runtime"] if every else []
    if not every and rows["beam"].nunique() > 1:
        settings = ["beam"]
    event = st.dataframe(
        rows,
        hide_index=True,
        height=ROWS_SHOWN * WRAPPED_ROW + 38,
        row_height=WRAPPED_ROW,
        column_order=[
            "caption",
            "model",
            score,
            *(["confidence"] if confident else []),
            "logprob",
            "image",
            "split",
            *settings,
            *others,
        ],
        column_config={
            "caption": st.column_config.TextColumn(width=CAPTION_WIDTH),
            score: st.column_config.ProgressColumn(
                bleu_label(order), format="%.1f", min_value=0.0, max_value=100.0
            ),
            "confidence": st.column_config.NumberColumn(
                "confidence", format="%.2f", help="How sure the model is of its caption (0–1)"
            ),
            "logprob": st.column_config.NumberColumn("log-prob", format="%.2f"),
            **{
                c: st.column_config.NumberColumn(
                    f"BLEU-{c[-1]}", format="%.1f", help=bleu_label(int(c[-1]))
                )
                for c in others
            },
        },
        placeholder="—",
        on_select="rerun",
        selection_mode="single-row",
        key=table_key("explore-table", filt),
    )
    selected = [r for r in event.selection.rows if r < len(rows)]
    if selected:
        row = rows.iloc[selected[0]]
        detail(preds, str(row["image"]), str(row["split"]), ds, every)


def side(pair: pd.Series, prefix: str) -> None:
    """One model of a disagreeing pair: its name in its colour, its scores and its caption."""
    model = str(pair[f"{prefix}_model"])
    facts = [f"sentence BLEU-4 {pair[f'{prefix}_bleu']:.1f}"]
    if pd.notna(pair[f"{prefix}_confidence"]):
        facts.append(f"confidence {pair[f'{prefix}_confidence']:.2f}")
    st.markdown(
        f"{dot(model)} **{components.escape_markdown(model)}** :gray[· {' · '.join(facts)}]",
        unsafe_allow_html=True,
    )
    st.markdown(f"“{components.escape_markdown(str(pair[f'{prefix}_caption']))}”")


def pair_id(pair: pd.Series) -> str:
    """Identifies a pair across reruns: its split, image and both models."""
    parts = (pair["split"], pair["image"], pair["resnet_model"], pair["vgg_model"])
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


def toggle_pair(pid: str) -> None:
    """Open the pair ``pid``'s image and captions, or close them when they are open."""
    opened = st.session_state.get("gap-open")
    st.session_state["gap-open"] = None if opened == pid else pid


with tab_gap:
    st.markdown(
        "Images where a ResNet and a VGG model with the same decoder disagree most: the "
        f"largest gap in {bleu_label(4)} between their captions, each model at its default "
        "decoding."
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
        top = h3.slider("Show the top", 5, 50, 10, step=5, key="gap-top")
        shown = gaps[(gaps["split"] == gap_split) & gaps["decoder"].isin(gap_decoders)]
        shown = shown.head(top).reset_index(drop=True)
        st.caption(
            f"{len(shown)} pairs · gap = ResNet minus VGG, {bleu_label(4)} · "
            "*Image and every caption* shows the photo, its references and every model's "
            "caption of it."
        )
        for rank, pair in shown.iterrows():
            pid = pair_id(pair)
            with st.container(border=True, key=f"gap-pair-{pid}"):
                st.markdown(
                    f"**{rank + 1}. {components.escape_markdown(str(pair['image']))}** "
                    f":gray[· {pair['decoder']} decoder ·] gap **{pair['gap']:+.1f}**"
                )
                left, right = st.columns(2)
                with left:
                    side(pair, "resnet")
                with right:
                    side(pair, "vgg")
                opened = st.session_state.get("gap-open") == pid
                st.button(
                    "Hide the image" if opened else "Image and every caption",
                    key=f"gap-show-{pid}",
                    icon=":material/expand_less:" if opened else ":material/image:",
                    on_click=toggle_pair,
                    args=(pid,),
                )
                if opened:
                    detail(preds, str(pair["image"]), str(pair["split"]), ds)
