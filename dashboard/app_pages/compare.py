"""Compare page: one photo through every model side by side, then test metrics and latency."""

from __future__ import annotations

import streamlit as st

from captioning.bundle.catalog import BundleInfo
from captioning.bundle.format import BundleError
from captioning.data.images import ImageLoadError
from captioning.models.bleu import sentence_bleu_smoothed
from captioning.models.decoding import MAX_BEAM
from captioning.models.metrics import METRIC_LABELS
from dashboard import charts, components, state, tables

MAX_COLUMNS = 3  # caption cards per row: one per decoder kind
PHOTO_BOX = (760, 440)

st.title("Compare models", anchor=False)
st.markdown(
    "The same photo through every model: one row per encoder (ResNet50, VGG16), one column per "
    "decoder (*inject*, *merge*, *attention*), and ensembles of several models in a row of their "
    "own. Below, each model's corpus scores on the test split and its latency."
)

bundles = components.require_bundles()
colors = charts.model_colors([b.name for b in bundles])


def caption_card(bundle: BundleInfo, picked: components.PickedImage, beam: int) -> None:
    """One model's caption of the photo: name, decoder, caption, timings and runtime."""
    st.markdown(
        f"<span style='color:{colors[bundle.name]}'>●</span> **{bundle.name}** "
        f":gray[· {bundle.decoder} decoder]",
        unsafe_allow_html=True,
    )
    try:
        with st.spinner("Captioning…"):
            res = state.caption(bundle, picked.data, picked.digest, beam)
            runtime = state.runtime_label(bundle)
    except ImageLoadError as e:
        st.error(str(e), icon=":material/broken_image:")
        return
    except (BundleError, OSError) as e:
        st.error(f"Cannot use this model: {e}")
        return
    st.markdown(f"#### {res.text or '(empty caption)'}")
    with st.container(horizontal=True, gap="medium"):
        components.timing_metrics(res.timings, runtime)
    note = f"log-prob {res.score:.2f}"
    if picked.references:
        b4 = sentence_bleu_smoothed(res.text, picked.references)["bleu4"]
        note += f" · smoothed sentence BLEU-4 {b4:.1f}"
    st.caption(note)


controls, photo = st.columns([2, 3], gap="large")
with controls:
    picked = components.image_picker("compare", allow_dataset=True)
    beam = st.slider("Beam size", 1, MAX_BEAM, 3, key="compare-beam")
    if picked is not None and picked.split is not None:
        st.markdown(f"**Reference captions** ({picked.split} split)")
        components.references_list(picked.references)
with photo:
    if picked is not None:
        st.image(picked.display(PHOTO_BOX), caption=picked.name)

st.subheader("Captions", anchor=False)
if picked is None:
    st.info("Pick a photo above to caption it with every model.", icon=":material/image:")
else:
    shown_encoder = None
    for encoder, cells in components.model_grid(bundles, MAX_COLUMNS):
        if encoder != shown_encoder:
            st.markdown(f"##### {tables.pretty_encoder_group(encoder)}")
            shown_encoder = encoder
        for col, bundle in zip(st.columns(len(cells), gap="small"), cells, strict=True):
            if bundle is not None:
                with col.container(border=True, key=f"compare-model-{bundle.name}"):
                    caption_card(bundle, picked, beam)

st.divider()
wide = tables.corpus_metrics(bundles, "test")
st.subheader("Scores on the test split", anchor=False)
if wide.empty:
    st.info(
        "No model has test metrics yet. Evaluate with "
        "`python -m captioning evaluate --model NAME --split test --record`.",
        icon=":material/analytics:",
    )
else:
    beams = sorted({int(b) for b in wide["beam"].dropna()})
    beam_text = "beam " + "/".join(map(str, beams)) if beams else "beam ?"
    st.plotly_chart(
        charts.metrics_bars(
            tables.metrics_long(wide),
            colors,
            title=f"corpus BLEU (test split, {beam_text}), CIDEr-D"
            + ("" if wide["meteor"].isna().all() else " and METEOR"),
        ),
        key="compare-metrics-chart",
    )
    st.dataframe(
        wide.rename(columns={**METRIC_LABELS, "n_images": "images"}),
        hide_index=True,
        placeholder="n/a",
        column_config={
            label: st.column_config.NumberColumn(label, format="%.1f")
            for label in METRIC_LABELS.values()
        },
    )
    notes = [
        "Corpus scores on the 0–100 scale (CIDEr-D ×100), against all of each image's references."
    ]
    missing = [b.name for b in bundles if b.name not in set(wide["model"])]
    if missing:
        notes.append(f"Not evaluated on test: {', '.join(missing)}.")
    if wide["meteor"].isna().any():
        notes.append(
            "METEOR is n/a where it was not computed (it needs Java); the chart leaves "
            "out a metric no model has."
        )
    st.caption(" ".join(notes))

st.subheader("Latency", anchor=False)
latency = tables.latency_table(bundles)
benchmarked = latency["status"] != tables.NOT_BENCHMARKED
shown = latency if benchmarked.any() else latency[["model", "status"]]
st.dataframe(
    shown.rename(columns={"status": "precision"}),
    hide_index=True,
    width="stretch" if benchmarked.any() else "content",
    placeholder="—",
    column_config={
        c: st.column_config.NumberColumn(c, format="%.0f" if "ms" in c else "%.1f")
        for c in shown.columns[2:]
    },
)
st.caption(
    "Per image at batch 1 on the machine that ran the benchmark (p50 / p90 over runs after a "
    "warm-up); images/s is batch throughput. Models marked *not benchmarked* have no "
    "bench.json: `python -m captioning bench --model NAME --save`."
)
